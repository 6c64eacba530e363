"""Test helper: capture the parameters a trainer hands to its optimizer, before the first step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rlhfkit import train_utils as U


@contextlib.contextmanager
def initial_parameters() -> Iterator[dict]:
    """While active, every trainer's `train_utils.make_optimizer` call records {"named": its (name, parameter)
    list, "before": a copy of each trainable parameter}; compare "before" with "named" after the run."""
    captured: dict = {}
    real = U.make_optimizer

    def spy(params, cfg, named):
        captured["named"] = named
        captured["before"] = {n: p.detach().clone() for n, p in named if p.requires_grad}
        return real(params, cfg, named)

    U.make_optimizer = spy
    try:
        yield captured
    finally:
        U.make_optimizer = real
