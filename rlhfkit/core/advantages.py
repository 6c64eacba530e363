"""Advantage estimators: GAE (PPO), discounted returns, RLOO, GRPO, REINFORCE++.

Shapes: B batch, T completion length, G group size (completions per prompt). Grouped functions
expect the B = n_prompts * G rows ordered prompt-major: rows [k*G, (k+1)*G) share a prompt.
Tests: `pytest tests/core/test_advantages.py -q`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .logprobs import masked_whiten


def gae(*, rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438).

    rewards, values, mask: (B, T). γ = gamma, λ = lam. Returns (advantages, returns), each (B, T):
        δ_t = r_t + γ V_{t+1} - V_t,    A_t = δ_t + γλ A_{t+1},    returns_t = A_t + V_t
    i.e. A_t = δ_t + γλ δ_{t+1} + (γλ)^2 δ_{t+2} + ... over the real tokens.
    Masked positions (mask == 0) are skipped: "t+1" is the next real token, so right padding,
    left padding and holes all work; the value after the last real token is 0 (episode ends).
    Outputs are 0 where mask == 0. A reverse loop over T with batched tensor ops;
    gae_reference is the scalar version it is tested against.
    """
    keep = mask.bool()  # (B, T)
    next_value = values.new_zeros(values.shape[0])  # (B,) V_{t+1}, 0 after the last token
    next_adv = values.new_zeros(values.shape[0])  # (B,) A_{t+1}
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv_t = delta + gamma * lam * next_adv  # (B,)
        next_adv = torch.where(keep[:, t], adv_t, next_adv)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(keep[:, t], adv_t, 0.0)
    returns = torch.where(keep, advantages + values, 0.0)  # (B, T)
    return advantages, returns


def gae_reference(
    *, rewards: list[list[float]], values: list[list[float]], mask: list[list[int]], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    """Plain-Python scalar GAE over nested lists; the readable reference `gae` is tested against."""
    all_adv, all_ret = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        real = [t for t, m in enumerate(m_row) if m]  # positions of real tokens, in order
        adv, ret = [0.0] * len(m_row), [0.0] * len(m_row)
        next_value, next_adv = 0.0, 0.0
        for t in reversed(real):
            delta = r_row[t] + gamma * next_value - v_row[t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v_row[t]
            adv[t], ret[t] = next_adv, next_adv + v_row[t]
        all_adv.append(adv)
        all_ret.append(ret)
    return all_adv, all_ret


def discounted_returns(*, rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + γ G_{t+1} over real tokens (masked positions skipped, 0 in the output). (B, T) -> (B, T).

    Equal to gae with V = 0 and λ = 1."""
    advantages, _ = gae(rewards=rewards, values=torch.zeros_like(rewards), mask=mask, gamma=gamma, lam=1.0)
    return advantages


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"expected per-sequence rewards of shape (B,), got {tuple(rewards.shape)}")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"batch of {rewards.shape[0]} is not a multiple of group_size={group_size} >= 2")
    return rewards.reshape(-1, group_size)  # (B/G, G)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

    rewards: (B,) one score per completion, G = group_size per prompt. Returns (B,):
        A_i = r_i - (1 / (G - 1)) Σ_{j≠i} r_j
    Example (tested): [1, 0, 0, 1] -> baselines [1/3, 2/3, 2/3, 1/3] -> [2/3, -2/3, -2/3, 2/3].
    """
    r = _groups(rewards, group_size)  # (B/G, G)
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # (B/G, G)
    return (r - baseline).reshape(-1)


def grpo_advantages(
    rewards: Tensor,
    group_size: int,
    scale: Literal["std", "none"] = "std",
    unbiased_std: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, https://arxiv.org/abs/2402.03300).

    rewards: (B,), G = group_size. Returns (B,):
        scale="std":  A_i = (r_i - mean_g) / (std_g + eps)
        scale="none": A_i =  r_i - mean_g   (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783:
                      dividing by std up-weights prompts that are nearly always right or wrong)
    unbiased_std=True (default, as torch.std and TRL): std over the group with G - 1; False: with G.
    Example (tested): [1, 0, 0, 1], mean 0.5; unbiased std = sqrt(1/3) = 0.5774 -> ±0.866;
    population std = 0.5 -> ±1 (before eps). A group with all-equal rewards gets 0.
    """
    r = _groups(rewards, group_size)  # (B/G, G)
    centered = r - r.mean(-1, keepdim=True)  # (B/G, G)
    if scale == "std":
        centered = centered / (r.std(-1, keepdim=True, correction=1 if unbiased_std else 0) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    return centered.reshape(-1)


def reinforce_pp_advantages(
    *, rewards: Tensor, mask: Tensor, gamma: float = 1.0, unbiased: bool = True, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, https://arxiv.org/abs/2501.03262; OpenRLHF "reinforce").

    rewards, mask: (B, T) per-token rewards (score on the last token plus the KL penalty, see
    rewards.per_token_rewards). returns = discounted_returns(rewards); advantages = returns whitened
    (mean shifted) over all real tokens of the batch: a global baseline, no critic, no groups.
    Returns (advantages, returns), each (B, T), 0 where mask == 0. Variance: masked_var(unbiased).
    For data parallel, pass the gathered global batch: per-rank whitening is a different estimator.
    """
    returns = discounted_returns(rewards=rewards, mask=mask, gamma=gamma)  # (B, T)
    return masked_whiten(returns, mask, shift_mean=True, unbiased=unbiased, eps=eps), returns
