"""Fixtures of the data-parallel tests: single-process reference runs (in this process, once per session) and one
2-process launch (torchrun) running every stage, so the suite starts the worker processes once."""

from __future__ import annotations

import json

import pytest
import torch
from dist_helpers import command, torchrun

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


def launch(root, commands: dict, checks: bool):
    """One `torchrun --nproc_per_node 2` of tests/distributed/dist_stages.py running `commands` (name -> argv) and,
    with checks, the helper checks. Returns (root, results, CompletedProcess)."""
    spec = root / "spec.json"
    spec.write_text(json.dumps({"commands": commands, "checks": checks, "checks_dir": str(root)}))
    proc = torchrun("tests/distributed/dist_stages.py", str(spec), str(root / "results.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root, json.loads((root / "results.json").read_text()), proc


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory):
    """The default suite's 2-process launch: PPO (the RL method) and the rlhfkit.distributed helper checks."""
    root = tmp_path_factory.mktemp("two_processes")
    return launch(root, {"ppo": command("ppo", root / "ppo")}, checks=True)


@pytest.fixture(scope="session")
def two_processes_more(tmp_path_factory):
    """The slow suite's launch: DPO, the deep RM, and SFT and PPO runs stopped after 2 of 3 steps (resumed by one
    process in the tests)."""
    root = tmp_path_factory.mktemp("two_processes_more")
    commands = {stage: command(stage, root / stage) for stage in ("dpo", "rm")}
    for stage in ("sft", "ppo"):
        commands[f"{stage}_stopped"] = command(stage, root / f"{stage}_stopped", "run.stop_after_steps=2")
    return launch(root, commands, checks=False)
