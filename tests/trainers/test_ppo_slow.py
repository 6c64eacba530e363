"""The PPO acceptance run (-m slow, about 1-2 minutes on 2 free CPU cores): stories260k learns to use more words
from a positive-word list (tests/fixtures/positive_reward.py) with the default hyperparameters, while the KL to the
reference stays bounded; every trainable parameter changes and the saved policy reloads and samples.

Measured (docs/ppo.md): the mean score goes from 0.055 at update 1 to 0.13 over the last three of 12 updates,
KL at most 3.5 nats per sequence; 50 s on 1 thread of the shared 2-core machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from spies import initial_parameters  # tests/trainers/spies.py

from rlhfkit.config import load_config
from rlhfkit.trainers import ppo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "positive_reward.py"
KL_BOUND = 10.0
"""Nats per sequence (48 tokens): the test's bound on objective/kl, ~0.2 nats per token."""


@pytest.mark.slow
def test_reward_rises_with_bounded_kl(tmp_path):
    n = torch.get_num_threads()
    cfg = load_config(ppo.PPOConfig, None, {
        "reward.function": f"{FIXTURE}:positivity", "run.output_dir": str(tmp_path), "train.steps": "12",
        "run.progress": "false", "run.threads": "1", "run.save_every": "6"})
    try:
        with initial_parameters() as captured:
            ppo.main(cfg, [])
    finally:
        torch.set_num_threads(n)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]["objective/score"]
    last = sum(r["objective/score"] for r in rows[-3:]) / 3
    print(f"score {first:.4f} -> {last:.4f}; kl {[round(r['objective/kl'], 2) for r in rows]}")
    assert last > 2 * first and last - first > 0.04, (first, last)
    assert max(r["objective/kl"] for r in rows) < KL_BOUND
    assert all(r["policy/ratio_first_min"] == 1.0 == r["policy/ratio_first_max"] for r in rows)
    named = dict(captured["named"])
    assert not [k for k, before in captured["before"].items() if torch.equal(before, named[k].detach())]
    from rlhfkit import models as M
    from rlhfkit.config import GenConfig, ModelConfig
    from rlhfkit.rollout import sample

    tok = M.load_tokenizer("stories260k")
    model = M.load_causal_lm(ModelConfig(name=str(tmp_path / "model")), torch.device("cpu"))
    out = sample(model, tok, [tok("Once upon a time")["input_ids"]], GenConfig(max_new_tokens=8, temperature=0))
    assert len(out.completion_ids[0]) == 8
    assert (tmp_path / "checkpoints" / "step-0000006" / "trainer_state.pt").is_file()
