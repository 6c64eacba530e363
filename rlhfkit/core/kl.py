"""Per-token KL estimators and KL-coefficient controllers.

The estimators approximate KL(π || π_ref) from tokens sampled from π, given the sampled tokens'
log-probabilities (Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).
With logr = ref_logprobs - logprobs = log(π_ref / π) and r = exp(logr):
    k1 = -logr                 unbiased, high variance, can be negative per token
    k2 = 0.5 * logr^2          biased, low variance, >= 0
    k3 = (r - 1) - logr        unbiased, low variance, >= 0
All take and return (B, T) (any same shape); they do not mask. Tests: `pytest tests/core/test_kl.py -q`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def kl_k1(*, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π - log π_ref."""
    return logprobs - ref_logprobs


def kl_k2(*, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (log π - log π_ref)^2. Its gradient (log π - log π_ref) ∇log π is the
    on-policy score-function gradient of KL(π || π_ref)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(*, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r, r = π_ref / π = exp(ref_logprobs - logprobs).

    Used as a loss term (GRPO) its gradient is biased: ∂k3/∂log π = 1 - r has mean 0 under π
    (trl#4967). Use kl_k3_plus, or losses.kl_loss_term with old_logprobs, for a loss.
    """
    logr = ref_logprobs - logprobs
    return torch.expm1(logr) - logr


def kl_k3_plus(*, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Value of k3, gradient of k2 (veRL's "low_var_kl+" / "k3+" straight-through trick):
    k2 + stopgrad(k3 - k2)."""
    k2 = kl_k2(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return k2 + (kl_k3(logprobs=logprobs, ref_logprobs=ref_logprobs) - k2).detach()


KL_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k3_plus": kl_k3_plus,
}
"""Name -> estimator, for configs that pick one by name."""


def kl_estimate(estimator: str, *, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Dispatch to KL_ESTIMATORS[estimator]; ValueError for an unknown name."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs=logprobs, ref_logprobs=ref_logprobs)


class FixedKLController:
    """Constant β. Same interface as AdaptiveKLController (lm-human-preferences train_policy.py)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards `target`.

    Exactly lm-human-preferences train_policy.py (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593):
        err  = clip(current_kl / target - 1, -0.2, 0.2)
        β   *= 1 + err * n_steps / horizon
    current_kl: mean per-sequence KL (summed over tokens) of the batch; n_steps: samples
    (sequences) consumed since the last update, i.e. the batch size; horizon: in samples (OpenAI 10000).
    Checkpoint `.value` to resume.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
