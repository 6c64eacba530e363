"""Tests for rlhfkit.core.losses: hand-computed values, gradients, and aggregation invariance."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.core import (
    aggregate,
    bradley_terry_loss,
    dpo_loss,
    kl_loss_term,
    ppo_policy_loss,
    regression_loss,
    sft_loss,
    value_loss,
)

LN2 = math.log(2.0)


# ---------------------------------------------------------------- aggregate
def test_aggregate_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask).item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4 tokens
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)  # (6/3 + 4/1) / 2
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)  # (6 + 4) / 2
    assert aggregate(loss, mask, "seq-mean-token-sum", normalizer=2 * 3).item() == pytest.approx(10 / 6)  # Dr. GRPO
    with pytest.raises(ValueError):
        aggregate(loss, mask, "token-sum")


def _random_batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 3, 5])  # unequal on purpose
    mask = (torch.arange(T) < lengths[:, None]).long()
    return loss, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_gradient_accumulation_equals_full_batch(mode):
    loss, mask = _random_batch()
    full = aggregate(loss, mask, mode)
    n_global = mask.sum().item() if mode == "token-mean" else loss.shape[0]
    # 2 micro-batches whose losses are summed (what gradient accumulation does to gradients)
    micro = [aggregate(loss[i : i + 2], mask[i : i + 2], mode, normalizer=n_global) for i in (0, 2)]
    torch.testing.assert_close(sum(micro), full)
    if mode == "token-mean":
        # the naive per-micro-batch mean is different (lengths 6+1 vs 3+5): the normalizer matters
        naive = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode) for i in (0, 2)) / 2
        assert not torch.allclose(naive, full)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_data_parallel_ranks_equal_full_batch(mode):
    loss, mask = _random_batch(seed=1)
    weights = loss.clone().requires_grad_(True)
    full = aggregate(weights * 1.0, mask, mode)
    (full_grad,) = torch.autograd.grad(full, weights)
    world = 2
    n_global = mask.sum().item() if mode == "token-mean" else loss.shape[0]
    # DDP averages gradients over ranks: rank k's loss uses normalizer N_global / W
    ranks = [aggregate(weights[k::world], mask[k::world], mode, normalizer=n_global / world) for k in range(world)]
    averaged = sum(ranks) / world
    torch.testing.assert_close(averaged, full)
    (grad,) = torch.autograd.grad(averaged, weights)
    torch.testing.assert_close(grad, full_grad)


# ---------------------------------------------------------------- PPO
def _ppo(ratio, adv, clip_coef=0.2, **kw):
    ratio = torch.tensor([[ratio]], dtype=torch.float64)
    logprobs = ratio.log().requires_grad_(True)
    loss, stats = ppo_policy_loss(
        logprobs=logprobs, old_logprobs=torch.zeros_like(ratio), advantages=torch.tensor([[adv]], dtype=torch.float64),
        mask=torch.ones(1, 1), clip_coef=clip_coef, **kw,
    )
    return loss, stats, logprobs


def test_ppo_clip_hand_computed():
    # ratio 1.5, A = +1: max(-1.5, -clip(1.5) = -1.2) = -1.2, clipped -> no gradient
    loss, stats, lp = _ppo(1.5, 1.0)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clipfrac"].item() == 1.0
    loss.backward()
    assert lp.grad.item() == 0.0
    # ratio 0.5, A = -1: max(0.5, clip(0.5) = 0.8) = 0.8
    loss, stats, _ = _ppo(0.5, -1.0)
    assert loss.item() == pytest.approx(0.8)
    assert stats["clipfrac"].item() == 1.0
    # ratio 1.5, A = -1: max(1.5, 1.2) = 1.5, the unclipped (pessimistic) term: clipfrac 0, gradient flows
    loss, stats, lp = _ppo(1.5, -1.0)
    assert loss.item() == pytest.approx(1.5)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    assert lp.grad.item() == pytest.approx(1.5)  # d(-A ρ)/dlogρ = -A ρ = 1.5
    # clip-higher: ratio 1.25, A = +1, ε_low .2, ε_high .28: 1.25 < 1.28 so unclipped -> -1.25
    loss, stats, _ = _ppo(1.25, 1.0, clip_coef_high=0.28)
    assert loss.item() == pytest.approx(-1.25)
    assert stats["clipfrac"].item() == 0.0


def test_ppo_ratio_one_stats():
    # first minibatch: ratio exactly 1 -> loss = -mean A, clipfrac 0, approx_kl 0, ratio min = max = 1
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    loss, stats = ppo_policy_loss(
        logprobs=lp, old_logprobs=lp.clone(), advantages=torch.tensor([[1.0, -2.0, 4.0]]),
        mask=torch.ones(1, 3), clip_coef=0.2,
    )
    assert loss.item() == pytest.approx(-1.0)  # -(1 - 2 + 4) / 3
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == stats["ratio_min"].item() == stats["ratio_max"].item() == 1.0


def test_ppo_approx_kl_masking_and_sequence_advantages():
    # token 0: ratio 2 -> k3 = (2 - 1) - ln 2 = .30685; token 1: ratio 1 -> 0; token 2 is a pad with ratio e^5
    logprobs = torch.tensor([[LN2, 0.0, 5.0]])
    _, stats = ppo_policy_loss(
        logprobs=logprobs, old_logprobs=torch.zeros(1, 3), advantages=torch.tensor([1.0]),  # (B,) broadcast
        mask=torch.tensor([[1, 1, 0]]), clip_coef=0.2,
    )
    assert stats["approx_kl"].item() == pytest.approx((1 - LN2) / 2)
    assert stats["ratio_max"].item() == pytest.approx(2.0)  # the pad's e^5 is ignored
    assert stats["ratio_min"].item() == pytest.approx(1.0)
    assert stats["clipfrac"].item() == pytest.approx(0.5)  # ratio 2 > 1.2 with A > 0


# ---------------------------------------------------------------- value
def test_value_loss_hand_computed():
    def run(v, old, ret, clip=0.2):
        return value_loss(values=torch.tensor([[v]]), old_values=torch.tensor([[old]]), returns=torch.tensor([[ret]]),
                          mask=torch.ones(1, 1), clip_coef=clip)
    # v 2, old 1, R 0: V_clip = 1.2; errors 4 and 1.44 -> 0.5 * 4 = 2; clipped error smaller -> vf_clipfrac 0
    loss, stats = run(2.0, 1.0, 0.0)
    assert loss.item() == pytest.approx(2.0) and stats["vf_clipfrac"].item() == 0.0
    # v 1.5, old 1, R 2: V_clip = 1.2; errors .25 and .64 -> 0.5 * .64 = .32; vf_clipfrac 1
    loss, stats = run(1.5, 1.0, 2.0)
    assert loss.item() == pytest.approx(0.32) and stats["vf_clipfrac"].item() == 1.0
    # no clipping: 0.5 * .25 = .125
    loss, _ = run(1.5, 1.0, 2.0, clip=None)
    assert loss.item() == pytest.approx(0.125)


# ---------------------------------------------------------------- SFT, reward model
def test_sft_loss_hand_computed_and_matches_cross_entropy():
    # logits [0, ln 3] -> p(label 1) = .75 -> nll = -ln .75 = .28768
    loss, stats = sft_loss(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-math.log(0.75))
    assert stats["num_tokens"].item() == 1
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ce = F.cross_entropy(logits.reshape(-1, 7), labels.masked_fill(mask == 0, -100).reshape(-1))
    torch.testing.assert_close(sft_loss(logits, labels, mask)[0], ce)


def test_bradley_terry_by_hand():
    loss, stats = bradley_terry_loss(chosen_scores=torch.tensor([0.3, 0.3]), rejected_scores=torch.tensor([0.3, 0.3]))
    assert loss.item() == pytest.approx(LN2)  # -log σ(0) = ln 2
    assert stats["accuracy"].item() == 0.0  # ties are not correct
    # diff 1: -log σ(1) = ln(1 + e^-1) = .31326; with margin 1: -log σ(0) = ln 2
    loss, stats = bradley_terry_loss(chosen_scores=torch.tensor([1.0]), rejected_scores=torch.tensor([0.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1))) and stats["accuracy"].item() == 1.0
    loss, _ = bradley_terry_loss(chosen_scores=torch.tensor([1.0]), rejected_scores=torch.tensor([0.0]), margin=1.0)
    assert loss.item() == pytest.approx(LN2)


def test_regression_loss_by_hand():
    loss, stats = regression_loss(torch.tensor([1.0, -3.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx(5.0)  # (1 + 9) / 2
    assert stats["mae"].item() == pytest.approx(2.0)  # (1 + 3) / 2


# ---------------------------------------------------------------- DPO
def _dpo(pc, pr, rc, rr, **kw):
    t = lambda x: torch.tensor([x])  # noqa: E731
    return dpo_loss(policy_chosen_logps=t(pc), policy_rejected_logps=t(pr), ref_chosen_logps=t(rc),
                    ref_rejected_logps=t(rr), **kw)


def test_dpo_equal_log_ratios_is_log2():
    # policy log-ratio (-5) - (-7) = 2 equals reference's (-4) - (-6) = 2 -> h = 0 -> -log σ(0) = ln 2
    loss, stats = _dpo(-5.0, -7.0, -4.0, -6.0, beta=0.1)
    assert loss.item() == pytest.approx(LN2)
    assert stats["rewards/margins"].item() == pytest.approx(0.0)
    for loss_type, ls in [("conservative", 0.1), ("robust", 0.1)]:
        # h = 0: (1-ε) ln2 + ε ln2 = ln 2;  robust: ((1-ε) ln2 - ε ln2) / (1-2ε) = ln 2
        loss, _ = _dpo(-5.0, -7.0, -4.0, -6.0, beta=0.1, loss_type=loss_type, label_smoothing=ls)
        assert loss.item() == pytest.approx(LN2)


def test_dpo_hand_computed():
    # chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1, h = 2, βh = .2
    loss, stats = _dpo(-1.0, -3.0, -2.0, -2.0, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))  # -log σ(.2) = .59814
    assert stats["rewards/chosen"].item() == pytest.approx(0.1)  # β * 1
    assert stats["rewards/rejected"].item() == pytest.approx(-0.1)
    assert stats["rewards/margins"].item() == pytest.approx(0.2)
    assert stats["rewards/accuracies"].item() == 1.0
    # -log σ(.2) = .59814, -log σ(-.2) = .79814
    cons = _dpo(-1.0, -3.0, -2.0, -2.0, beta=0.1, loss_type="conservative", label_smoothing=0.1)[0]
    assert cons.item() == pytest.approx(0.9 * 0.598139 + 0.1 * 0.798139, abs=1e-5)  # .61814
    rob = _dpo(-1.0, -3.0, -2.0, -2.0, beta=0.1, loss_type="robust", label_smoothing=0.1)[0]
    assert rob.item() == pytest.approx((0.9 * 0.598139 - 0.1 * 0.798139) / 0.8, abs=1e-5)  # .57314
    ipo = _dpo(-1.0, -3.0, -2.0, -2.0, beta=0.1, loss_type="ipo")[0]
    assert ipo.item() == pytest.approx(9.0)  # (h - 1/(2β))^2 = (2 - 5)^2
    with pytest.raises(ValueError):
        _dpo(-1.0, -3.0, -2.0, -2.0, beta=0.1, label_smoothing=0.1)  # sigmoid takes no smoothing
    with pytest.raises(ValueError):
        _dpo(-1.0, -3.0, -2.0, -2.0, beta=0.1, loss_type="hinge")


def test_dpo_gradient_pushes_chosen_up():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=torch.tensor([-1.0]),
                       ref_rejected_logps=torch.tensor([-1.0]), beta=0.5)
    loss.backward()
    # d/dh[-log σ(βh)] at h=0 = -β σ(0) = -.25; dh/dpc = 1, dh/dpr = -1
    assert pc.grad.item() == pytest.approx(-0.25) and pr.grad.item() == pytest.approx(0.25)


# ---------------------------------------------------------------- KL in the loss (GRPO)
def test_kl_loss_term_gradients_by_hand():
    # π = .5, π_ref = .25: k3 = ln2 - .5 = .19315; plain k3 gradient wrt log π = 1 - r = 1 - .5 = .5
    ref = torch.log(torch.tensor([[0.25]]))
    lp = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    loss, stats = kl_loss_term(logprobs=lp, ref_logprobs=ref, mask=torch.ones(1, 1))
    assert loss.item() == pytest.approx(LN2 - 0.5) and stats["kl"].item() == pytest.approx(LN2 - 0.5)
    loss.backward()
    assert lp.grad.item() == pytest.approx(0.5)
    # with the IS ratio at ρ = 1: gradient ρ k3 + (1 - r) = (ln2 - .5) + .5 = ln 2 = log π - log π_ref
    lp.grad = None
    loss, _ = kl_loss_term(logprobs=lp, ref_logprobs=ref, mask=torch.ones(1, 1), old_logprobs=lp.detach())
    assert loss.item() == pytest.approx(LN2 - 0.5)
    loss.backward()
    assert lp.grad.item() == pytest.approx(LN2)


def test_kl_loss_term_ignores_whatever_sits_at_masked_positions():
    # pads: the policy scores -200, the reference 0 (exp(200) overflows float32 in k3); the loss and its gradient
    # must equal those with benign pad values, and the pad gradient must be exactly 0, not NaN
    lp_real = torch.tensor([[-1.0, -2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    for estimator in ("k3", "k3_plus"):
        for old in (None, "old"):
            grads = []
            for pad_lp, pad_ref in ((-200.0, 0.0), (-3.0, -3.0)):
                lp = lp_real.clone()
                lp[0, 2:] = pad_lp
                r = ref.clone()
                r[0, 2:] = pad_ref
                lp.requires_grad_(True)
                loss, stats = kl_loss_term(logprobs=lp, ref_logprobs=r, mask=mask, estimator=estimator,
                                           old_logprobs=r if old else None)
                loss.backward()
                assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and torch.isfinite(stats["kl"])
                assert torch.equal(lp.grad[0, 2:], torch.zeros(2))
                grads.append((loss.item(), lp.grad[0, :2].clone()))
            assert grads[0][0] == pytest.approx(grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


def test_kl_loss_term_expected_gradient_is_true_kl_gradient():
    # Exact expectation over a 4-token vocabulary, no sampling: E_{y~π_old}[∇ term(y)] with π_old = π_θ
    # (on-policy, ρ = 1) must equal ∇ KL(π_θ || π_ref) = ∇ Σ_y π_θ(y) (log π_θ(y) - log π_ref(y)).
    theta = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=torch.float64, requires_grad=True)  # logits
    ref = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5, 0.2], dtype=torch.float64), -1)
    lp = torch.log_softmax(theta, -1)
    (true_grad,) = torch.autograd.grad((lp.exp() * (lp - ref)).sum(), theta)

    def expected_grad(importance_sampling=False, estimator="k3"):
        lp = torch.log_softmax(theta, -1)
        old = lp.detach()
        expectation = 0.0
        for y in range(4):  # each call scores one sampled token y; weight it by π_old(y)
            term, _ = kl_loss_term(
                logprobs=lp[y].reshape(1, 1), ref_logprobs=ref[y].reshape(1, 1), mask=torch.ones(1, 1),
                old_logprobs=old[y].reshape(1, 1) if importance_sampling else None, estimator=estimator,
            )
            expectation = expectation + old[y].exp() * term
        (g,) = torch.autograd.grad(expectation, theta)
        return g

    torch.testing.assert_close(expected_grad(importance_sampling=True), true_grad)  # k3 · ρ: unbiased
    torch.testing.assert_close(expected_grad(estimator="k3_plus"), true_grad)  # veRL k3+: unbiased
    assert not torch.allclose(expected_grad(), true_grad, atol=1e-3)  # plain k3: biased (trl#4967)
