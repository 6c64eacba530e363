"""Linear reward model: BT objective by hand, recovery of a planted w, least squares, ties, save/load."""

import math

import numpy as np
import pytest
import torch

from rlhfkit.core import bradley_terry_loss
from rlhfkit.reward import LinearRewardModel, load_reward_model
from rlhfkit.reward.deep import pair_loss_sum
from rlhfkit.reward.features import HandcraftedExtractor
from rlhfkit.reward.linear import bt_objective, fit_linear

LN2 = math.log(2.0)


def test_bt_loss_is_log2_at_equal_scores():
    s = torch.tensor([0.3, -1.2, 5.0])
    loss, stats = bradley_terry_loss(chosen_scores=s, rejected_scores=s.clone())
    assert loss.item() == pytest.approx(LN2)  # −log σ(0) = log 2
    # the linear objective with w = 0 scores every text the same: log 2 too
    d = torch.randn(7, 3, dtype=torch.float64)
    assert bt_objective(torch.zeros(3, dtype=torch.float64), d, torch.ones(7, dtype=torch.float64),
                        torch.zeros(7, dtype=torch.float64)).item() == pytest.approx(LN2)


def test_pair_loss_sum_by_hand():
    # preference with Δ = 1, margin 1: −log σ(0) = log 2; tie with Δ = 2: ½(log(1+e^-2) + log(1+e^2)) = 1.0635...
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    total = pair_loss_sum(chosen, rejected, torch.tensor([False, True]), torch.tensor([1.0, 0.0]))
    tie = 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(2)))
    assert total.item() == pytest.approx(LN2 + tie, abs=1e-6)
    # a tie at equal scores also costs log 2, and its gradient is zero there
    s = torch.tensor([0.5], requires_grad=True)
    loss = pair_loss_sum(s, torch.tensor([0.5]), torch.tensor([True]), None)
    loss.backward()
    assert loss.item() == pytest.approx(LN2) and abs(s.grad.item()) < 1e-7


def planted_pairs(n: int, d: int, seed: int = 0):
    """Pairs of random feature vectors labelled by sampling P(a ≻ b) = σ(w*ᵀ(a − b))."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=d)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    p = 1 / (1 + np.exp(-(a - b) @ w_star))
    a_wins = rng.random(n) < p
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    return w_star, chosen - rejected


def test_recovers_planted_w():
    w_star, diff = planted_pairs(4000, 10)
    w, b, stats = fit_linear(pair_diff=diff, l2=1e-4)
    cos = float(w @ w_star / np.linalg.norm(w) / np.linalg.norm(w_star))
    assert cos > 0.95, cos
    assert stats["grad_norm"] < 1e-5  # L-BFGS converged to the (convex) optimum
    assert b == 0.0


def test_lbfgs_matches_gradient_descent_optimum():
    # the optimum is unique (strictly convex with l2 > 0): plain gradient descent reaches the same w
    _, diff = planted_pairs(300, 4, seed=1)
    w, _, _ = fit_linear(pair_diff=diff, l2=0.1)
    x = torch.as_tensor(diff)
    v = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(3000):
        opt.zero_grad()
        loss = bt_objective(v, x, torch.ones(300, dtype=torch.float64), torch.zeros(300, dtype=torch.float64))
        (loss + 0.05 * v @ v).backward()
        opt.step()
    np.testing.assert_allclose(w, v.detach().numpy(), atol=1e-5)


def test_least_squares_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 4.0 + 0.01 * rng.normal(size=200)
    w, b, stats = fit_linear(rating_x=x, rating_y=y, l2=0.0)
    ref, *_ = np.linalg.lstsq(np.c_[x, np.ones(200)], y, rcond=None)
    np.testing.assert_allclose(np.r_[w, b], ref, atol=1e-8)
    assert stats["solver"] == "least_squares"


def test_ties_pull_scores_together_and_margin_widens_gap():
    _, diff = planted_pairs(500, 3, seed=3)
    w_tie, _, _ = fit_linear(pair_diff=diff, pair_target=np.full(500, 0.5), l2=1e-3)
    assert np.abs(w_tie).max() < 1e-4  # only ties: the optimum scores every pair equal, w = 0
    w0, _, _ = fit_linear(pair_diff=diff, l2=1e-2)
    w1, _, _ = fit_linear(pair_diff=diff, pair_margin=np.full(500, 2.0), l2=1e-2)
    assert np.mean(diff @ w1) > np.mean(diff @ w0)  # a margin asks for larger gaps


def test_joint_pairs_and_ratings_fit_both():
    rng = np.random.default_rng(4)
    w_star, diff = planted_pairs(2000, 6, seed=4)
    x = rng.normal(size=(400, 6))
    y = x @ w_star + 1.0
    w, b, stats = fit_linear(pair_diff=diff, rating_x=x, rating_y=y, l2=1e-4, rating_coef=1.0)
    cos = float(w @ w_star / np.linalg.norm(w) / np.linalg.norm(w_star))
    assert cos > 0.99 and stats["solver"] == "lbfgs"
    assert b == pytest.approx(1.0, abs=0.2)


def test_save_load_roundtrip_scores(tmp_path):
    ext = HandcraftedExtractor()
    rng = np.random.default_rng(5)
    rm = LinearRewardModel(ext, rng.normal(size=ext.dim), 0.3, rng.normal(size=ext.dim), rng.random(ext.dim) + 0.5,
                           shift=0.7, scale=2.0)
    prompts = ["Q: hi?", [{"role": "user", "content": "What is 2+2?"}]]
    comps = ["Hello there, friend!", "It is 4. Sorry, I think so."]
    expected = rm.score(prompts, comps)
    raw = rm.raw_scores(prompts, comps)
    np.testing.assert_allclose(expected, (raw - 0.7) / 2.0)
    rm.save(tmp_path / "model")
    loaded = load_reward_model(tmp_path)  # a run folder holding model/ works as well
    assert loaded.kind == "linear"
    np.testing.assert_allclose(loaded.score(prompts, comps), expected, rtol=1e-12)
    assert loaded.score([], []) == []
