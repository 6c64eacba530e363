"""Tests for rlhfkit.core.rewards: where the score goes, the KL part, the missing-EOS penalty."""

import pytest
import torch

from rlhfkit.core import missing_eos_penalty, per_token_rewards, response_mask


def test_per_token_rewards_right_padded_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref = torch.zeros(2, 4)
    # logprobs - ref = k1; the 9s sit at pads and must be ignored
    logprobs = torch.tensor([[0.5, 0.5, 0.5, 9.0], [1.0, 1.0, 9.0, 9.0]])
    rewards, non_score, kl = per_token_rewards(
        scores=torch.tensor([2.0, 3.0]), logprobs=logprobs, ref_logprobs=ref, mask=mask, kl_coef=0.1
    )
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.5, 0.5, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    # non_score = -0.1 * kl
    torch.testing.assert_close(non_score, torch.tensor([[-0.05, -0.05, -0.05, 0.0], [-0.1, -0.1, 0.0, 0.0]]))
    # score on the last real token: row 0 index 2 (-0.05 + 2 = 1.95), row 1 index 1 (-0.1 + 3 = 2.9)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 1.95, 0.0], [-0.1, 2.9, 0.0, 0.0]]))


def test_per_token_rewards_left_padded_and_empty_rows():
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    zeros = torch.zeros(3, 3)
    rewards, _, _ = per_token_rewards(
        scores=torch.tensor([1.0, 2.0, 5.0]), logprobs=zeros, ref_logprobs=zeros, mask=mask, kl_coef=0.1
    )
    # left padding: the score goes to the last column; an empty row gets no score at all
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_score_lands_on_eos_and_never_on_a_pad():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 2], [2, 0, 0, 0]])  # eos = 2, pad = 0
    mask = response_mask(ids, 2)
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, non_score, _ = per_token_rewards(scores=scores, logprobs=lp, ref_logprobs=ref, mask=mask, kl_coef=0.0)
    # kl_coef 0: rewards are exactly the scores at the EOS positions 1, 3, 0
    expected = torch.zeros(3, 4)
    expected[0, 1], expected[1, 3], expected[2, 0] = 10.0, 20.0, 30.0
    torch.testing.assert_close(rewards, expected)
    rewards, non_score, _ = per_token_rewards(scores=scores, logprobs=lp, ref_logprobs=ref, mask=mask, kl_coef=0.3)
    assert (rewards[mask == 0] == 0).all() and (non_score[mask == 0] == 0).all()
    torch.testing.assert_close((rewards - non_score).sum(-1), scores)


def test_per_token_rewards_other_estimator():
    # π = 0.5, π_ref = 0.25 -> k3 = ln 2 - 0.5 = 0.19315; kl_coef 1 -> reward -0.19315 + score 1
    lp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    rewards, _, kl = per_token_rewards(
        scores=torch.tensor([1.0]), logprobs=lp, ref_logprobs=ref, mask=torch.ones(1, 1), kl_coef=1.0, estimator="k3"
    )
    assert kl.item() == pytest.approx(0.19314718)
    assert rewards.item() == pytest.approx(1 - 0.19314718)


def test_missing_eos_penalty_subtract_and_replace():
    scores = torch.tensor([1.0, 2.0])
    has_eos = torch.tensor([True, False])
    # subtract (TRL): 2 - 1 = 1 for the truncated row; the other row untouched
    assert missing_eos_penalty(scores, has_eos, 1.0).tolist() == [1.0, 1.0]
    # replace (OpenAI): the truncated row's score becomes -1
    assert missing_eos_penalty(scores, has_eos, -1.0, mode="replace").tolist() == [1.0, -1.0]
    assert scores.tolist() == [1.0, 2.0]  # not in place
    with pytest.raises(ValueError):
        missing_eos_penalty(scores, has_eos, 1.0, mode="clip")
