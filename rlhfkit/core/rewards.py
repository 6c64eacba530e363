"""Turn sequence scores into per-token rewards with a KL penalty (PPO-style RLHF).

Vocabulary (lm-human-preferences train_policy.py compute_rewards): `score` is the reward model's
scalar per sequence, `non_score_rewards` the KL part, `rewards` their per-token sum.
Shapes: B batch, T completion length. Tests: `pytest tests/core/test_rewards.py -q`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .kl import kl_estimate
from .masks import last_token_index, sequence_lengths


def per_token_rewards(
    *,
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """rewards_t = -β KL_t  +  score * [t == last real token].

    scores: (B,); logprobs, ref_logprobs, mask: (B, T). β = kl_coef. estimator: a kl.KL_ESTIMATORS
    name ("k1" as in lm-human-preferences and TRL PPO).
    Returns (rewards, non_score_rewards, kl), each (B, T) and 0 where mask == 0.
    The score goes on the last position with mask != 0 (the EOS, or the last generated token of a
    truncated completion), for right- and left-padded masks, never on a pad (trl#3750). A row
    without any real token gets no score. Call under torch.no_grad(): rewards are targets.
    """
    keep = mask.bool()  # (B, T)
    kl = kl_estimate(estimator, logprobs=logprobs, ref_logprobs=ref_logprobs)  # (B, T)
    kl = torch.where(keep, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    non_score_rewards = -kl_coef * kl  # (B, T)
    last = last_token_index(mask).clamp(min=0).unsqueeze(-1)  # (B, 1)
    placed = torch.where(sequence_lengths(mask) > 0, scores.to(kl.dtype), 0.0).unsqueeze(-1)  # (B, 1)
    rewards = non_score_rewards.scatter_add(-1, last, placed)  # (B, T)
    return rewards, non_score_rewards, kl


def missing_eos_penalty(
    scores: Tensor, has_eos: Tensor, penalty: float, mode: Literal["subtract", "replace"] = "subtract"
) -> Tensor:
    """Penalise completions that hit the length limit without a stop token. Returns new (B,) scores.

    scores: (B,); has_eos: (B,) bool (masks.has_eos).
    mode="subtract": score - penalty for rows without EOS (TRL's missing_eos_penalty; pass penalty > 0).
    mode="replace":  the score *becomes* penalty (OpenAI lm-human-preferences used a fixed
                     penalty_reward_value = -1; pass the negative value itself).
    Rows with EOS are unchanged.
    """
    if mode == "subtract":
        penalised = scores - penalty
    elif mode == "replace":
        penalised = torch.full_like(scores, penalty)
    else:
        raise ValueError(f"mode must be 'subtract' or 'replace', got {mode!r}")
    return torch.where(has_eos.bool(), scores, penalised)
