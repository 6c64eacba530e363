"""rlhfkit.core: pure tensor math for RLHF (log-probs, masks, KL, rewards, advantages, losses).

Imports torch and the standard library only: no transformers, no distributed, no I/O, so the math can
be imported and tested alone (`pytest tests/core -q`). Functions taking several same-shaped tensors are
keyword-only; losses return (loss, stats).
"""

from .advantages import (
    discounted_returns,
    gae,
    gae_reference,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from .kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_plus,
)
from .logprobs import entropy_from_logits, gather_logprobs, masked_mean, masked_sum, masked_var, masked_whiten
from .losses import (
    aggregate,
    bradley_terry_loss,
    dpo_loss,
    kl_loss_term,
    ppo_policy_loss,
    regression_loss,
    sft_loss,
    value_loss,
)
from .masks import first_true_index, has_eos, last_token_index, response_mask, sequence_lengths
from .rewards import missing_eos_penalty, per_token_rewards

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "aggregate",
    "bradley_terry_loss",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "first_true_index",
    "gae",
    "gae_reference",
    "gather_logprobs",
    "grpo_advantages",
    "has_eos",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_plus",
    "kl_loss_term",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "missing_eos_penalty",
    "per_token_rewards",
    "ppo_policy_loss",
    "regression_loss",
    "reinforce_pp_advantages",
    "response_mask",
    "rloo_advantages",
    "sequence_lengths",
    "sft_loss",
    "value_loss",
]
