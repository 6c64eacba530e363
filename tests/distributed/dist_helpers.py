"""Shared pieces of the data-parallel tests: tiny stage commands, launchers, and the 1-vs-2-process comparisons.

Tolerance (TOL = 1e-6; absolute for weights, relative for logged numbers above 1): a 2-process step is the
single-process step up to float rounding. Each rank sums the gradients of its share of the micro-batches (divided
by N / W) and the engine averages the W ranks' sums, while one process adds all micro-batches in one order; float
addition is not associative, so the last bits may differ. Logged statistics are likewise summed per rank in
float32, then across ranks in float64. Weights here are below 1 in magnitude, so 1e-6 is about ten float32 ulps
after a few Adam steps; a real bug is orders of magnitude larger (normalising by the rank's own token count instead
of the global one, or whitening per rank, moves the first loss or the first update by more than 1e-3). In
practice, with W = 2 the runs below come out bit-identical, or within 1e-7 (docs/scaling.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
REWARD = f"{REPO / 'tests' / 'fixtures' / 'positive_reward.py'}:positivity"
TOL = 1e-6
COMMON = ["run.progress=false", "run.threads=1", "run.log_every=1"]


def small_pairs() -> Path:
    """The first 48 bundled fluency pairs as a JSONL file (scoring all 514 each run would dominate the tests)."""
    import gzip
    import tempfile

    path = Path(tempfile.gettempdir()) / f"rlhfkit_dist_pairs_{os.getuid()}.jsonl"
    src = REPO / "rlhfkit" / "assets" / "data" / "tinystories_fluency_pairs.jsonl.gz"
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()[:48]
    text = "".join(line + "\n" for line in lines)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


PAIRS = small_pairs()
# Tiny runs: 3 optimizer steps, 2 micro-batches per rank per step (so accumulation + no_sync run), short texts.
COMMANDS = {
    "sft": ["sft", "data.train=bundled:tinystories_train.jsonl.gz", "data.max_length=48", "data.eval_fraction=0.01",
            "train.batch_size=8", "train.micro_batch_size=2", "train.steps=3", "optim.warmup_steps=1", *COMMON],
    "dpo": ["dpo", f"data.train={PAIRS}", "data.max_length=48", "data.eval_fraction=0.2", "train.batch_size=8",
            "train.micro_batch_size=2", "train.steps=3", "train.precompute_ref_logprobs=true",
            "train.eval_batch_size=4", *COMMON],
    "rm": ["rm", "train", "model.kind=deep", f"data.train={PAIRS}", "data.max_length=48", "data.eval_fraction=0.2",
           "train.normalize_samples=16", "train.batch_size=8", "train.micro_batch_size=2", "train.steps=3", *COMMON],
    # rollout 8 = 2 ranks x 4 rows = 2 x gen.batch_size: every row is sampled as in one process (chunk seeds)
    "ppo": ["ppo", f"reward.function={REWARD}", "train.rollout_batch_size=8", "train.num_minibatches=2",
            "train.micro_batch_size=2", "train.update_epochs=2", "gen.max_new_tokens=10", "gen.batch_size=4",
            "reward.normalize_samples=8", "whiten_rewards=true", "optim.lr=1e-3", "train.steps=3",
            "train.sample_every=1", *COMMON],
}
WEIGHTS = {"sft": ["model"], "dpo": ["model"], "rm": ["model"], "ppo": ["model", "value_model"]}


def command(stage: str, out: Path, *extra: str) -> list[str]:
    return [*COMMANDS[stage], f"run.output_dir={out}", *extra]


def env() -> dict:
    # one OpenMP thread per process: two processes share the 2 cores of the test machines
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (a free port each time)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env())


def accelerate_launch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env())


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(one: Path, two: Path, tol: float = TOL) -> None:
    """Every logged number of both runs within tol, relative above 1 (summed log-probs reach -50: float32 keeps
    7 digits); time/* and dist/world_size excepted; same steps and keys."""
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(("time/", "dist/"))}
        assert keys == {k for k in rb if not k.startswith(("time/", "dist/"))}
        for k in keys:
            assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])


def max_weight_diff(one: Path, two: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_same_weights(one: Path, two: Path, stage: str, tol: float = TOL) -> None:
    for sub in WEIGHTS[stage]:
        diff = max_weight_diff(one / sub, two / sub)
        assert diff <= tol, (stage, sub, diff)


def tensors_equal_within(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a.numel() == 0 or bool((a.double() - b.double()).abs().max() <= tol))
