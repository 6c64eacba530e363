"""Data parallel == one process for the grpo trainer (PITFALLS 7-8): a 2-process torchrun (gloo, CPU) of `rlhfkit grpo`
(2 epochs x 2 minibatches: the old-log-prob pass, sharded then gathered) and `rlhfkit rloo` (the on-policy step:
each rank fills its rows' old log-probs and per-token advantages in its training forward) logs the same metrics and
writes the same weights as one process, within the tolerance of tests/distributed/dist_helpers.py (float summation
order across ranks). The groups of G = 4 land on different ranks; advantages use the gathered global batch.
A third run has whole groups in every rank's micro-batches, so each prompt runs once per forward (prompt
sharing under DDP). Launches tests/distributed/dist_stages.py (the harness of the other stages' data-parallel
tests) once; -m slow (about 30 s of CPU, 60 s of wall time on the shared 2-core machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit import cli

REPO = Path(__file__).resolve().parents[2]
REWARD = f"{REPO / 'tests' / 'fixtures' / 'positive_reward.py'}:positivity"
TOL = 1e-6
# rollout 8 = 2 ranks x 4 rows = 2 x gen.batch_size: every row is sampled as in one process (chunk seeds)
COMMON = [f"reward.function={REWARD}", "train.rollout_batch_size=8", "train.num_generations=4",
          "train.micro_batch_size=2", "gen.max_new_tokens=10", "gen.batch_size=4", "reward.normalize_samples=8",
          "optim.lr=1e-3", "train.steps=2", "train.sample_every=1", "run.progress=false", "run.threads=1"]
COMMANDS = {"grpo": ["grpo", *COMMON, "train.update_epochs=2", "train.num_minibatches=2"],
            "rloo": ["rloo", *COMMON],
            # every rank's rollout share (8), minibatch share (4) and micro-batch (4) hold whole groups: each prompt
            # runs once per pass (rl.shared_prompt_logprobs) inside the DDP-wrapped forward
            "grpo_shared_prompts": ["grpo", *COMMON, "train.rollout_batch_size=16", "train.micro_batch_size=4",
                                    "train.update_epochs=2", "train.num_minibatches=2"]}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_dp")
    spec = {"commands": {name: [*argv, f"run.output_dir={root / 'two' / name}"] for name, argv in COMMANDS.items()},
            "checks": False}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "tests/distributed/dist_stages.py", str(root / "spec.json"), str(root / "results.json")],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        for name, argv in COMMANDS.items():
            cli.run_command([*argv, f"run.output_dir={root / 'one' / name}"])
    finally:
        torch.set_num_threads(threads)
    return root, proc


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_two_processes_equal_one_process(runs, name):
    from safetensors.torch import load_file

    root, _ = runs
    one, two = root / "one" / name, root / "two" / name
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    assert a[0]["dist/world_size"] == 1 and b[0]["dist/world_size"] == 2
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(("time/", "dist/"))}
        assert keys == {k for k in rb if not k.startswith(("time/", "dist/"))}
        for k in keys:
            # logprob_diff_max is a difference of log-probs near -5 whose last bits move with the weights' (1e-7
            # relative): its tolerance is that of a log-probability, not of a number near 1e-5
            tol = 1e-5 if k == "rollout/logprob_diff_max" else TOL * max(1.0, abs(ra[k]))
            assert abs(ra[k] - rb[k]) <= tol, (ra["step"], k, ra[k], rb[k])
        assert rb["policy/ratio_first_min"] == 1.0 == rb["policy/ratio_first_max"]
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL
    assert (one / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()  # rank 0 writes once
