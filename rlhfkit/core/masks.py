"""Masks over completion tokens: where a completion stops, its length, its last real token.

Pure torch. Shapes: B batch, T completion length. Masks returned here are int64 (0/1), like HF
attention masks; functions taking a mask accept bool/int/float (a position counts when != 0).
Tests: `pytest tests/core/test_masks.py -q`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def first_true_index(bools: Tensor, dim: int = -1) -> Tensor:
    """Index of the first True along dim; the length of dim where there is none.

    bools: (..., L) -> (...) int64. Example: [[F, T, T], [F, F, F]] -> [1, 3].
    Same contract as first_true_indices in summarize_from_feedback_details.
    """
    bools = bools.bool().movedim(dim, -1)  # (..., L)
    length = bools.shape[-1]
    pos = torch.arange(length, device=bools.device)  # (L,)
    return torch.where(bools, pos, length).min(-1).values if length else pos.new_zeros(bools.shape[:-1])


def response_mask(
    completion_ids: Tensor, eos_token_id: int | Sequence[int], lengths: Tensor | None = None
) -> Tensor:
    """1 for completion tokens up to and including the first stop token, 0 after.

    completion_ids: (B, T) generated ids only (look for EOS in the completion, never in the prompt:
    trl#6805). eos_token_id: one id or several stop ids. lengths: (B,) optional number of valid
    generated tokens per row (e.g. from the inference engine); positions >= lengths are 0 too.
    Returns (B, T) int64. The EOS itself is kept (mask 1) so the policy learns to stop (trl#1623);
    whatever follows it (pads, even more EOS-like ids) is 0. A row without EOS is 1 for all
    positions < lengths (truncated: see rewards.missing_eos_penalty).
    Example: ids [5, 2, 7, 2], eos 2 -> [1, 1, 0, 0].
    """
    stop_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)  # (S,)
    is_stop = torch.isin(completion_ids, stop_ids)  # (B, T)
    end = first_true_index(is_stop) + 1  # (B,) exclusive end; T + 1 when no EOS
    if lengths is not None:
        end = torch.minimum(end, lengths.to(end.device, end.dtype))
    pos = torch.arange(completion_ids.shape[-1], device=completion_ids.device)  # (T,)
    return (pos.unsqueeze(0) < end.unsqueeze(-1)).long()  # (B, T)


def has_eos(completion_ids: Tensor, eos_token_id: int | Sequence[int], lengths: Tensor | None = None) -> Tensor:
    """(B,) bool: whether the completion contains a stop token (within lengths, if given)."""
    stop_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)  # (S,)
    first = first_true_index(torch.isin(completion_ids, stop_ids))  # (B,)
    if lengths is None:
        return first < completion_ids.shape[-1]
    return first < lengths.to(first.device)


def sequence_lengths(mask: Tensor) -> Tensor:
    """Number of real tokens per row: (B, T) -> (B,) int64."""
    return (mask != 0).sum(-1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row: (B, T) -> (B,) int64; -1 for a row without any 1.

    Works for right-padded ([1, 1, 0] -> 1) and left-padded ([0, 1, 1] -> 2) masks, unlike
    lengths - 1, which is wrong under left padding. Callers must not index with the -1 of an
    empty row (it would wrap to the last position).
    """
    length = mask.shape[-1]
    return length - 1 - first_true_index(mask.flip(-1) != 0)
