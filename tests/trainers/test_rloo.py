"""RLOO (rlhfkit rloo = the grpo trainer with advantage=rloo, kl_mode=reward): what is specific to it.

The shared loop (exact first ratio, resume, group layout for both grpo and rloo, on-policy shortcut) is tested in
test_grpo.py; the reward-rises run is in test_grpo_slow.py (-m slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit import cli
from rlhfkit.config import load_config
from rlhfkit.trainers import grpo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "positive_reward.py"
TINY = {"train.rollout_batch_size": "8", "train.num_generations": "4", "train.micro_batch_size": "4",
        "gen.max_new_tokens": "10", "train.sample_every": "0", "reward.normalize": "none", "run.progress": "false",
        "optim.lr": "1e-3", "run.threads": "1", "train.steps": "2"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_constant_reward_gives_zero_gradient(tmp_path):
    """Every completion scores 1: the leave-one-out baseline is 1, advantages 0; with policy == reference the KL
    penalty is 0 too, so the first update has an exactly zero gradient (REINFORCE without a baseline would not).
    gen.backend=hf: the reference then runs through the same module forward as the policy, so its log-probs are
    bit-identical (the default scores a frozen reference with rl.frozen_decoder, equal only to float rounding)."""
    const = tmp_path / "const.py"
    const.write_text("def one(prompts, completions):\n    return [1.0] * len(completions)\n")
    cfg = load_config(grpo.RLOOConfig, None, {"reward.function": f"{const}:one", "run.output_dir": str(tmp_path),
                                              **TINY, "gen.backend": "hf"})
    grpo.main(cfg, [])
    first, second = rows(tmp_path)
    assert first["grad_norm"] == 0.0 and first["advantages/abs_mean"] == 0.0 and first["objective/kl"] == 0.0
    assert first["groups/zero_std_share"] == 1.0
    assert second["objective/kl"] == 0.0  # nothing moved


def test_kl_in_the_reward_is_a_return_to_go(tmp_path, monkeypatch):
    """kl_mode=reward (rloo's default): A_t = A_seq - β Σ_{s>=t} (log π - log π_ref)_s on real tokens, computed in
    the training forward of each micro-batch; checked against that formula on the real tensors of update 2."""
    seen = []
    real = grpo.token_advantages

    def spy(cfg, **kw):
        out = real(cfg, **kw)
        seen.append(({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}, out.clone()))
        return out

    monkeypatch.setattr(grpo, "token_advantages", spy)
    result = cli.run_command(["rloo", f"reward.function={FIXTURE}:positivity", f"run.output_dir={tmp_path}",
                              *[f"{k}={v}" for k, v in TINY.items()]])
    assert result["objective/kl"] != 0.0
    checked = 0
    for kw, adv in seen[2:]:  # update 2 (2 micro-batches per update)
        mask = kw["mask"].bool()
        k1 = torch.where(mask, kw["logprobs"] - kw["ref_logprobs"], 0.0)  # (b, T)
        to_go = k1.flip(-1).cumsum(-1).flip(-1)  # Σ_{s>=t}
        expected = torch.where(mask, kw["seq_adv"].unsqueeze(-1) - kw["kl_coef"] * to_go, 0.0)
        torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
        assert kw["kl_coef"] == grpo.RLOOConfig().kl_coef > 0 and k1.abs().sum() > 0
        checked += 1
    assert checked == 2
    second = rows(tmp_path)[1]
    assert second["objective/non_score_reward"] == pytest.approx(-second["objective/kl_coef"] * second["objective/kl"])
