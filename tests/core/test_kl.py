"""Tests for rlhfkit.core.kl: estimator values, bias, gradients, and the KL controllers."""

import math

import pytest
import torch

from rlhfkit.core import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3, kl_k3_plus

ESTIMATORS = [kl_k1, kl_k2, kl_k3, kl_k3_plus]


@pytest.mark.parametrize("fn", ESTIMATORS)
def test_all_estimators_zero_when_policies_equal(fn):
    lp = torch.log(torch.tensor([[0.1, 0.5, 0.9]]))
    assert torch.equal(fn(logprobs=lp, ref_logprobs=lp.clone()), torch.zeros(1, 3))


def test_estimators_hand_computed():
    # π = 0.5, π_ref = 0.25: logr = ln(0.25 / 0.5) = -ln 2, r = 0.5
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2.0)
    assert kl_k1(logprobs=lp, ref_logprobs=ref).item() == pytest.approx(ln2)  # -logr = 0.6931
    assert kl_k2(logprobs=lp, ref_logprobs=ref).item() == pytest.approx(0.5 * ln2**2)  # 0.2402
    assert kl_k3(logprobs=lp, ref_logprobs=ref).item() == pytest.approx(-0.5 + ln2)  # (0.5 - 1) + ln 2 = 0.1931
    assert kl_k3_plus(logprobs=lp, ref_logprobs=ref).item() == pytest.approx(-0.5 + ln2)


def test_k1_and_k3_unbiased_k2_biased_exact_expectation():
    # exact expectation under p over a 3-token vocabulary (no sampling noise)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum()  # KL(p || q) = 0.5 ln 2.5 + 0.2 ln 0.4 = 0.27489
    assert true_kl.item() == pytest.approx(0.5 * math.log(2.5) + 0.2 * math.log(0.4))
    lp, lq = p.log(), q.log()
    for fn in (kl_k1, kl_k3):
        assert (p * fn(logprobs=lp, ref_logprobs=lq)).sum().item() == pytest.approx(true_kl.item())
    assert (p * kl_k2(logprobs=lp, ref_logprobs=lq)).sum().item() != pytest.approx(true_kl.item(), abs=1e-3)


def test_k3_nonnegative_and_k1_can_be_negative():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(64, generator=g) - 2
    ref = torch.randn(64, generator=g) - 2
    assert (kl_k3(logprobs=lp, ref_logprobs=ref) >= 0).all()
    assert (kl_k2(logprobs=lp, ref_logprobs=ref) >= 0).all()
    assert (kl_k1(logprobs=lp, ref_logprobs=ref) < 0).any()  # per token, k1 is not a divergence


def test_k3_plus_value_of_k3_gradient_of_k2():
    g = torch.Generator().manual_seed(1)
    base_lp, base_ref = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    lp1, ref1 = base_lp.clone().requires_grad_(True), base_ref.clone().requires_grad_(True)
    lp2, ref2 = base_lp.clone().requires_grad_(True), base_ref.clone().requires_grad_(True)
    plus = kl_k3_plus(logprobs=lp1, ref_logprobs=ref1)
    torch.testing.assert_close(plus, kl_k3(logprobs=base_lp, ref_logprobs=base_ref))
    plus.sum().backward()
    kl_k2(logprobs=lp2, ref_logprobs=ref2).sum().backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)  # = logprobs - ref_logprobs
    torch.testing.assert_close(lp1.grad, base_lp - base_ref)
    torch.testing.assert_close(ref1.grad, ref2.grad)


def test_kl_estimate_dispatch_and_unknown_name():
    lp, ref = torch.tensor([0.0]), torch.tensor([-1.0])
    assert kl_estimate("k1", logprobs=lp, ref_logprobs=ref).item() == 1.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate("k4", logprobs=lp, ref_logprobs=ref)


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 vs target 6: err = 9/6 - 1 = 0.5 -> clipped to 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512)
    # KL 5.4: err = 0.9 - 1 = -0.1 (inside the clip); mult = 1 - 0.1 * 100 / 10000 = 0.999
    ctl.update(torch.tensor(5.4), n_steps=100)
    assert ctl.value == pytest.approx(0.100512 * 0.999)  # 0.100411488
    # KL 0 -> err -1 clipped to -0.2; mult = 1 - 0.2 * 10000 / 10000 = 0.8
    ctl.update(0.0, n_steps=10000)
    assert ctl.value == pytest.approx(0.100411488 * 0.8)
    with pytest.raises(ValueError):
        AdaptiveKLController(init_kl_coef=0.1, target=0.0, horizon=10000)
