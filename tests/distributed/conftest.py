"""Fixtures of the data-parallel tests: single-process reference runs (in this process, once per session) and one
2-process launch (torchrun) running every stage, so the suite starts the worker processes once."""

from __future__ import annotations

import json

import pytest
import torch
from dist_helpers import COMMANDS, command, torchrun

from rlhfkit import cli


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(stage) -> output folder of the single-process run of COMMANDS[stage] (run on first use)."""
    root, done = tmp_path_factory.mktemp("one_process"), {}

    def run(stage: str):
        if stage not in done:
            threads = torch.get_num_threads()
            try:
                cli.run_command(command(stage, root / stage))
            finally:
                torch.set_num_threads(threads)  # run.threads=1 must not leak into other tests
            done[stage] = root / stage
        return done[stage]

    return run


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory):
    """One `torchrun --nproc_per_node 2` of tests/distributed/dist_stages.py: every stage of COMMANDS, plus runs
    stopped after 2 of 3 steps (resumed later by one process), plus the helper checks. Returns (root, results)."""
    root = tmp_path_factory.mktemp("two_processes")
    commands = {stage: command(stage, root / stage) for stage in COMMANDS if stage != "sft"}
    for stage in ("sft", "ppo"):
        commands[f"{stage}_stopped"] = command(stage, root / f"{stage}_stopped", "run.stop_after_steps=2")
    spec = root / "spec.json"
    spec.write_text(json.dumps({"commands": commands, "checks_dir": str(root)}))
    proc = torchrun("tests/distributed/dist_stages.py", str(spec), str(root / "results.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root, json.loads((root / "results.json").read_text()), proc
