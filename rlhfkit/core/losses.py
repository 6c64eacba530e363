"""All training losses. Each returns (loss, stats); stats values are detached 0-dim tensors
(call .item() when logging, to avoid a device sync per step).

Shapes: B batch, T completion length, V vocab. Sign convention: losses are minimised;
advantages > 0 mean "do more of this". Tests: `pytest tests/core/test_losses.py -q`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .kl import kl_estimate
from .logprobs import gather_logprobs, masked_mean, masked_sum

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def aggregate(loss: Tensor, mask: Tensor, mode: Aggregation = "token-mean", normalizer: float | None = None) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    token-mean (default):  Σ_{b,t} m·ℓ / N,  N = Σ m (tokens). Each token weighs the same; no bias
                           towards short answers (Dr. GRPO, DAPO).
    seq-mean-token-mean:   Σ_b (Σ_t m·ℓ / Σ_t m) / S,  S = B (sequences). Original GRPO; favours short answers.
    seq-mean-token-sum:    Σ_b Σ_t m·ℓ / S. With normalizer = B·T_max this is Dr. GRPO's constant normaliser.
    normalizer replaces N (token-mean) or S (seq-* modes). For gradient accumulation over micro-batches
    whose losses are summed, pass the full batch's N (or S). For data parallel with gradients averaged
    over W ranks, pass N_global / W. Then the total equals the full-batch loss (tested).
    """
    if mode == "token-mean":
        denom = mask.bool().sum().clamp(min=1) if normalizer is None else normalizer
        return masked_sum(loss, mask) / denom
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss, mask, dim=-1)  # (B,)
    elif mode == "seq-mean-token-sum":
        per_seq = masked_sum(loss, mask, dim=-1)  # (B,)
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}")
    return per_seq.sum() / (loss.shape[0] if normalizer is None else normalizer)


def ppo_policy_loss(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
    clip_coef_high: float | None = None,
    aggregation: Aggregation = "token-mean",
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), negated:
        ρ = exp(logprobs - old_logprobs),  ℓ_t = max(-A ρ, -A clip(ρ, 1 - ε_low, 1 + ε_high))
    logprobs, old_logprobs, mask: (B, T); advantages: (B, T), or (B,) for one advantage per sequence
    (GRPO/RLOO), broadcast over T. ε_low = clip_coef, ε_high = clip_coef_high or clip_coef (DAPO's
    clip-higher). Stats: clipfrac = share of tokens where the clipped term is the max (no gradient);
    approx_kl = mean k3 = mean((ρ - 1) - log ρ), an unbiased estimate of KL(π_old || π_θ)
    (joschu's blog, as cleanrl); ratio_mean/min/max over real tokens: all exactly 1 on the first
    minibatch of an update, else rollout and training disagree (PITFALLS 2).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    high = clip_coef if clip_coef_high is None else clip_coef_high
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, normalizer)
    with torch.no_grad():
        keep = mask.bool()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - logratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_min": torch.where(keep, ratio, torch.inf).min(),
            "ratio_max": torch.where(keep, ratio, -torch.inf).max(),
        }
    return loss, stats


def value_loss(
    *,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_coef: float | None,
    aggregation: Aggregation = "token-mean",
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / lm-human-preferences), all (B, T):
        V_clip = old_values + clip(values - old_values, -ε, ε)
        ℓ_t = 0.5 * max((values - returns)^2, (V_clip - returns)^2)
    clip_coef=None: no clipping, ℓ_t = 0.5 (values - returns)^2. Stats: vf_clipfrac = share of
    tokens where the clipped error is the larger one.
    """
    err = (values - returns) ** 2
    if clip_coef is None:
        per_token, clipped_err = 0.5 * err, err
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_coef, clip_coef)
        clipped_err = (v_clip - returns) ** 2
        per_token = 0.5 * torch.maximum(err, clipped_err)
    loss = aggregate(per_token, mask, aggregation, normalizer)
    return loss, {"vf_clipfrac": masked_mean((clipped_err > err).float(), mask).detach()}


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    aggregation: Aggregation = "token-mean",
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of labels. logits (B, T, V) already aligned with labels (B, T)
    (caller shifts: logits[:, :-1] vs ids[:, 1:]); mask (B, T) marks tokens to learn, which must
    include the EOS (trl#1623). Stats: num_tokens."""
    nll = -gather_logprobs(logits, labels)  # (B, T)
    loss = aggregate(nll, mask, aggregation, normalizer)
    return loss, {"num_tokens": mask.bool().sum().detach()}


def bradley_terry_loss(
    *, chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss, mean over (B,) pairs: -log σ(s_chosen - s_rejected - margin).
    margin: optional (B,) or scalar preference strength (Llama 2). Equal scores give log 2.
    Stats: accuracy = share of pairs with s_chosen > s_rejected; margin = mean(s_chosen - s_rejected)."""
    diff = chosen_scores - rejected_scores  # (B,)
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, stats


def regression_loss(pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean squared error for scalar-rating labels: mean((pred - target)^2). Stats: mae."""
    loss = ((pred - target) ** 2).mean()
    return loss, {"mae": (pred - target).abs().mean().detach()}


def dpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo", "robust", "conservative"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct preference optimisation losses, mean over (B,) pairs. Inputs: (B,) sequence log-probs
    (sum of token logprobs over the completion; length-averaged for IPO as in its paper and TRL).
    h = (log π(y_w) - log π(y_l)) - (log π_ref(y_w) - log π_ref(y_l)),  β = beta,  ε = label_smoothing.
        sigmoid       -log σ(βh)                                 (Rafailov et al. 2023, arXiv:2305.18290)
        conservative  -(1-ε) log σ(βh) - ε log σ(-βh)            (cDPO, labels flipped with prob. ε)
        robust        (-(1-ε) log σ(βh) + ε log σ(-βh)) / (1-2ε) (Chowdhury et al. 2024, arXiv:2403.00409)
        ipo           (h - 1/(2β))^2                             (Azar et al. 2023, arXiv:2310.12036)
    label_smoothing is only for conservative/robust (0 <= ε < 0.5). h = 0 gives log 2 for sigmoid.
    Stats: rewards/chosen = mean β(log π - log π_ref)(y_w), rewards/rejected likewise for y_l,
    rewards/margins = their mean difference, rewards/accuracies = share with chosen > rejected.
    """
    if loss_type in ("sigmoid", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is for 'conservative' or 'robust', not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)
    eps = label_smoothing
    if loss_type in ("sigmoid", "conservative"):
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
        stats = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        }
    return losses.mean(), stats


def kl_loss_term(
    *,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    old_logprobs: Tensor | None = None,
    estimator: str = "k3",
    aggregation: Aggregation = "token-mean",
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL(π_θ || π_ref) as a loss term (GRPO puts β times this in the loss, no KL in the reward).

    All (B, T). Without old_logprobs: aggregate(k(logprobs, ref_logprobs)). With old_logprobs (the
    rollout policy), each token is weighted by the importance ratio ρ = π_θ / π_old (not detached):
    E_{π_old}[ρ k3] = KL(π_θ || π_ref), and its gradient is the true KL gradient (for k3 at ρ = 1 the
    per-token gradient is (log π_θ - log π_ref) ∇log π_θ). Plain k3 has a biased gradient (trl#4967);
    the ratio is the fix of trl PR#4638; estimator="k3_plus" is veRL's alternative.
    The caller multiplies by β. Stats: kl = mean per-token estimate (unweighted).
    Masked positions count as ref = old = logprobs (KL 0, zero gradient): whatever sits there (pads scored by two
    different models, or left at 0) can reach exp() overflow in k3, and torch.where's zero gradient times an
    infinite one is NaN.
    """
    keep = mask.bool()
    ref_logprobs = torch.where(keep, ref_logprobs, logprobs.detach())
    if old_logprobs is not None:
        old_logprobs = torch.where(keep, old_logprobs, logprobs.detach())
    kl = kl_estimate(estimator, logprobs=logprobs, ref_logprobs=ref_logprobs)  # (B, T)
    weighted = kl if old_logprobs is None else torch.exp(logprobs - old_logprobs) * kl
    loss = aggregate(weighted, mask, aggregation, normalizer)
    return loss, {"kl": masked_mean(kl, mask).detach()}
