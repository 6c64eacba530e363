"""Data parallel == one process (PITFALLS 7-8). For DPO, the deep reward model and PPO, a 2-process run (torchrun,
gloo on CPU) with global batch B logs the same losses and statistics and ends with the same weights as a 1-process
run with batch B, within dist_helpers.TOL (the reason is written there). SFT's equality runs through
`accelerate launch` in test_dist_launch.py. Also: rank 0 alone writes, checkpoints of a 2-process run resume on
one process (the data position is in global samples), and the rlhfkit.distributed helpers match their
single-process definitions (global whitening and token count, uneven gather, sharded rollouts).
The 2-process work is one torchrun launch per suite (conftest: two_processes for the default suite,
two_processes_more for -m slow).
"""

from __future__ import annotations

import json

import pytest
import torch
from dist_helpers import (
    TOL,
    assert_same_metrics,
    assert_same_weights,
    command,
    rows,
    tensors_equal_within,
)

from rlhfkit import cli
from rlhfkit import distributed as D
from rlhfkit import train_utils as U


def test_ppo_two_processes_equal_one_process(reference, two_processes):
    root, _, _ = two_processes
    _equal(reference("ppo"), root / "ppo", "ppo")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_two_processes_equal_one_process(stage, reference, two_processes_more):
    root, _, _ = two_processes_more
    _equal(reference(stage), root / stage, stage)


def _equal(one, two, stage):
    assert_same_metrics(one, two)  # also: one metrics line per step, so rank 1 wrote none
    assert_same_weights(one, two, stage)
    assert {r["dist/world_size"] for r in rows(two)} == {2.0} and {r["dist/world_size"] for r in rows(one)} == {1.0}


def test_world_size_is_logged_once(two_processes):
    _, results, proc = two_processes
    assert results["checks"]["world_size"] == 2
    # the start line carries the world size, printed by rank 0 only (other ranks' stdout is silenced)
    lines = [ln for ln in proc.stdout.splitlines() if "world size 2 (engine ddp, backend gloo, rank 0" in ln]
    assert len(lines) == 1 and lines[0].startswith("ppo: "), proc.stdout[-2000:]
    assert "rank 1" not in proc.stdout


@pytest.mark.slow
def test_reward_model_normalised_and_evaluated_once(reference, two_processes_more):
    """rank 0 alone scores the reference set (shift) and the held-out pairs with the trained model"""
    root, _, _ = two_processes_more
    one, two = reference("rm"), root / "rm"
    meta = [json.loads((d / "model" / "reward_model.json").read_text())["normalization"] for d in (one, two)]
    assert abs(meta[0]["shift"] - meta[1]["shift"]) <= TOL and meta[0]["n"] == meta[1]["n"] == 16
    evals = [json.loads((d / "eval.json").read_text()) for d in (one, two)]
    assert evals[0]["pairs"] == evals[1]["pairs"] and abs(evals[0]["bt_loss"] - evals[1]["bt_loss"]) <= TOL


def test_ppo_rollouts_and_samples_equal(reference, two_processes):
    """the same completions (chunk seeds), scores and KL in samples.jsonl, each update written once"""
    root, _, _ = two_processes
    one, two = reference("ppo"), root / "ppo"
    a, b = ([json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()] for d in (one, two))
    assert [(r["step"], r["prompt"], r["completion"], r["score"]) for r in a] == \
           [(r["step"], r["prompt"], r["completion"], r["score"]) for r in b]
    assert all(abs(x["kl"] - y["kl"]) <= 1e-4 for x, y in zip(a, b))  # rounded to 4 digits in the file


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_checkpoint_of_two_processes_resumes_on_one(stage, reference, two_processes_more):
    root, _, _ = two_processes_more
    stopped = root / f"{stage}_stopped"
    # written once, by rank 0: one complete step folder and no temp folder left by a second writer
    assert [s for s, _ in U.list_checkpoints(stopped)] == [2] and not (stopped / "model").exists()
    assert not [p for p in (stopped / "checkpoints").iterdir() if p.name.startswith(".")]
    threads = torch.get_num_threads()
    try:
        cli.run_command(command(stage, stopped, "run.resume=true"))  # one process continues at global sample 2B
    finally:
        torch.set_num_threads(threads)
    assert_same_metrics(reference(stage), stopped)
    assert_same_weights(reference(stage), stopped, stage)


def test_global_whitening_and_token_count(two_processes):
    _, results, _ = two_processes
    whiten = results["checks"]["whiten"]
    # float64 moments: only summation order differs from core.masked_whiten on the concatenated batch
    assert all(whiten[k] <= 1e-12 for k in whiten if k.startswith("shift")), whiten
    assert whiten["global_count"] == whiten["expected_count"] > 0


def test_gather_of_uneven_shards(two_processes):
    _, results, _ = two_processes
    # rank 0 held [0, 1], rank 1 held [10, 11, 12]
    assert results["checks"]["gather"] == {"gathered": [0.0, 1.0, 10.0, 11.0, 12.0], "same_on_all_ranks": True}


def test_sharded_rollout_equals_single_process_rollout(two_processes):
    """generate_rollout on 2 ranks (4 rows each, gen.batch_size 2) + gather_rollout == one process's rollout:
    identical ids, masks, positions and widths (global P, T), texts and columns; log-probs within TOL."""
    from rlhfkit import models as M
    from rlhfkit import rl as R
    from rlhfkit import rollout
    from rlhfkit.config import GenConfig, ModelConfig

    root, results, _ = two_processes
    assert results["checks"]["rollout"] == {"local_rows": 4, "global_rows": 8, "columns": list(range(8))}
    saved = torch.load(root / "rollout.pt", weights_only=False)
    tok = M.load_tokenizer("stories260k")
    policy = M.load_causal_lm(ModelConfig(), torch.device("cpu")).eval()
    prompts = ["Once upon a time", "Lily had a", "The dog", "One day, Tom", "The sun was", "Mom said", "A little",
               "They went to"]
    ids = R.encode_prompts(tok, prompts, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (tiny ops: one thread is faster on a shared CPU)
    builds = []
    init = rollout.FastDecoder.__init__
    try:
        rollout.FastDecoder.__init__ = lambda self, *a, **k: (builds.append(1), init(self, *a, **k))[1]
        one = D.generate_rollout(D.World(), policy, tok, prompts, ids, GenConfig(max_new_tokens=8, batch_size=2),
                                 seed=5, columns={"k": list(range(8))})
        logprobs = R.forward_logprobs(policy, one, 1.0)[0]
    finally:
        rollout.FastDecoder.__init__ = init
        torch.set_num_threads(threads)
    assert len(builds) == 1 and policy not in rollout._DECODERS  # 4 chunks, one decoder, none kept after
    two = saved["batch"]
    for name in ("input_ids", "attention_mask", "position_ids", "completion_ids", "completion_mask", "has_eos"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    assert one.prompt_width == two.prompt_width and one.completions == two.completions
    assert one.prompts == two.prompts and one.columns == two.columns
    assert tensors_equal_within(logprobs, saved["logprobs"])
    assert len(set(one.completions)) > 1  # chunks got different seeds
