"""Acceptance runs (-m slow) of the critic-free methods on PPO's tiny task (tests/trainers/test_ppo_slow.py):
stories260k learns to use more words from a positive-word list (tests/fixtures/positive_reward.py) with each
command's default hyperparameters, while the KL to the reference stays bounded.

Measured figures (full-length runs) are in docs/critic_free.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.trainers import grpo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "positive_reward.py"
KL_BOUND = 12.0
"""Nats per 48-token sequence after 20 updates (PPO's acceptance test: 10 after 12). Measured 2026-11-29: the last
update's KL was 5.7 (grpo), 7.9 (Dr. GRPO), 7.2 (rloo), 9.2 (REINFORCE++); about 30 s per method on 1 thread."""

METHODS = {
    "grpo": (grpo.GRPOConfig, {}),
    "dr_grpo": (grpo.GRPOConfig, {"scale_rewards": "false", "loss_aggregation": "constant"}),
    "rloo": (grpo.RLOOConfig, {}),
    "reinforce_pp": (grpo.GRPOConfig, {"advantage": "reinforce_pp", "kl_mode": "reward"}),
    "reinforce_pp_baseline": (grpo.GRPOConfig, {"advantage": "reinforce_pp_baseline", "kl_mode": "reward"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_reward_rises_with_bounded_kl(tmp_path, method):
    cls, overrides = METHODS[method]
    n = torch.get_num_threads()
    cfg = load_config(cls, None, {"reward.function": f"{FIXTURE}:positivity", "run.output_dir": str(tmp_path),
                                  "train.steps": "20", "run.progress": "false", "run.threads": "1",
                                  "train.sample_every": "0", **overrides})
    try:
        grpo.main(cfg, [])
    finally:
        torch.set_num_threads(n)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["objective/score"] for r in rows[:2]) / 2
    last = sum(r["objective/score"] for r in rows[-3:]) / 3
    print(f"{method}: score {first:.4f} -> {last:.4f}; kl {[round(r['objective/kl'], 2) for r in rows]}")
    assert last > 1.8 * first and last - first > 0.04, (first, last)
    assert max(r["objective/kl"] for r in rows) < KL_BOUND
    assert all(r["policy/ratio_first_min"] == 1.0 == r["policy/ratio_first_max"] for r in rows)
    assert (tmp_path / "model" / "config.json").is_file()
