"""Tests for rlhfkit.core.advantages: hand-computed GAE/RLOO/GRPO and GAE vs the scalar reference."""

import pytest
import torch

from rlhfkit.core import (
    discounted_returns,
    gae,
    gae_reference,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


def test_gae_hand_computed_lambda_1_and_0():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # γ = 1: δ = [0 + .5 - .5, 0 + .5 - .5, 1 + 0 - .5] = [0, 0, .5]  (V after the last token = 0)
    # λ = 1: A_t = Σ δ = [.5, .5, .5]; returns = A + V = [1, 1, 1]
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    # λ = 0: A = δ = [0, 0, .5]; returns = [.5, .5, 1]
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.5, 1.0]]))


def test_gae_hand_computed_discounted():
    # r = [0, 1], V = [0, 0], γ = .9, λ = .95: δ = [0, 1]; A_1 = 1; A_0 = 0 + .9 * .95 * 1 = .855
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    adv, _ = gae(rewards=rewards, values=values, mask=mask, gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.855, 1.0]]))


def test_gae_padding_ignored_left_and_right():
    # the r=[0,0,1], V=.5 case again, padded with garbage rewards/values (7, 9) at masked positions
    right = dict(rewards=torch.tensor([[0.0, 0.0, 1.0, 7.0]]), values=torch.tensor([[0.5, 0.5, 0.5, 9.0]]),
                 mask=torch.tensor([[1, 1, 1, 0]]))
    left = dict(rewards=torch.tensor([[7.0, 0.0, 0.0, 1.0]]), values=torch.tensor([[9.0, 0.5, 0.5, 0.5]]),
                mask=torch.tensor([[0, 1, 1, 1]]))
    adv, ret = gae(**right, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    adv, ret = gae(**left, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_equals_scalar_reference_on_random_masked_data(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 8, 11
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos < lengths[:, None]).long()  # right padded, including empty and full rows
    mask[1] = (pos >= T - lengths[1]).long()  # a left-padded row
    mask[2] = (torch.rand(T, generator=g) > 0.4).long()  # holes (e.g. masked tool output)
    mask[3] = 1
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(
        rewards=rewards.tolist(), values=values.tolist(), mask=mask.tolist(), gamma=gamma, lam=lam
    )
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))


def test_discounted_returns_hand_computed():
    # r = [1, 0, 2], γ = .5: G_2 = 2, G_1 = 0 + .5 * 2 = 1, G_0 = 1 + .5 * 1 = 1.5; pad -> 0
    out = discounted_returns(rewards=torch.tensor([[1.0, 0.0, 2.0, 5.0]]), mask=torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.0, 2.0, 0.0]]))


def test_rloo_hand_computed():
    # baselines: mean of the other three: [(0+0+1)/3, (1+0+1)/3, (1+0+1)/3, (1+0+0)/3] = [1/3, 2/3, 2/3, 1/3]
    out = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    torch.testing.assert_close(out, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # two groups of 2: baseline is the other member: [3 - 1, 1 - 3, 5 - 5, 5 - 5]
    out = rloo_advantages(torch.tensor([3.0, 1.0, 5.0, 5.0]), group_size=2)
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.0, 0.0]))


def test_grouped_advantages_reject_bad_shapes():
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 2), group_size=2)


def test_grpo_std_choice_pinned():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean .5; unbiased std = sqrt((4 * .25) / 3) = .57735 -> .5 / (.57735 + 1e-4) = .86588 (≈ ±0.866)
    torch.testing.assert_close(grpo_advantages(r, 4), torch.tensor([0.86588, -0.86588, -0.86588, 0.86588]))
    # population std = .5 -> .5 / (.5 + 1e-4) = .99980
    torch.testing.assert_close(
        grpo_advantages(r, 4, unbiased_std=False), torch.tensor([0.99980, -0.99980, -0.99980, 0.99980])
    )
    # Dr. GRPO: no division -> ±.5
    torch.testing.assert_close(grpo_advantages(r, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # all-equal group: zero advantage, no NaN
    assert grpo_advantages(torch.tensor([3.0, 3.0]), 2).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        grpo_advantages(r, 4, scale="max")


def test_reinforce_pp_global_whitening_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 8.0]])  # 8 sits at a pad
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = reinforce_pp_advantages(rewards=rewards, mask=mask, gamma=1.0)
    # returns (γ=1): [[1, 1, 1], [0, 0, 0]]; the 5 real tokens have mean 3/5 = .6
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    # squared deviations 3 * .16 + 2 * .36 = 1.2; sample var 1.2 / 4 = .3; std .54772
    # (1 - .6) / .54772 = .73030; (0 - .6) / .54772 = -1.09545
    torch.testing.assert_close(adv, torch.tensor([[0.73030, 0.73030, 0.73030], [-1.09545, -1.09545, 0.0]]))
