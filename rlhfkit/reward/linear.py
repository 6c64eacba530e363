"""Linear reward model R(x) = wᵀz(x) + b over standardised features z = (φ(x) − μ) / σ.

Fitting (float64, torch only):
- pairs: Bradley-Terry logistic regression on feature differences d = z(chosen) − z(rejected),
      L(w) = mean_i[ −t_i log σ(wᵀd_i − m_i) − (1 − t_i) log σ(−wᵀd_i) ] + (λ/2)‖w‖²
  with target t = 1 for a preference and t = 0.5 for a tie (which pulls wᵀd to 0), and m the optional margin
  (label strength). Minimised with L-BFGS (strong Wolfe line search); the objective is convex, so this finds the
  global minimum. b cancels in differences and is 0.
- ratings: least squares, closed form: w = (Zcᵀ Zc / N + λI)⁻¹ Zcᵀ yc / N, b = ȳ (Zc, yc centred), the minimiser of
      (1/2) mean_i (wᵀz_i + b − y_i)² + (λ/2)‖w‖².
- both: the sum BT + rating_coef · (1/2) MSE + (λ/2)‖w‖², again with L-BFGS.

Saved as a folder with `reward_model.json` holding the weights, the feature spec and the score normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rlhfkit.config import atomic_write_text
from rlhfkit.errors import UserError
from rlhfkit.reward.features import Extractor, FeatureCache, featurize, make_extractor

META_FILE = "reward_model.json"


def _lbfgs(objective, w: torch.Tensor, max_iter: int) -> int:
    """Minimise objective(w) in place with L-BFGS; returns the number of function evaluations."""
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        calls[0] += 1
        return loss

    opt.step(closure)
    return calls[0]


def bt_objective(w: torch.Tensor, diff: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry negative log-likelihood; diff (N, D), target and margin (N,)."""
    z = diff @ w  # (N,)
    return -(target * F.logsigmoid(z - margin) + (1 - target) * F.logsigmoid(-z)).mean()


def fit_linear(*, pair_diff: np.ndarray | None = None, pair_target: np.ndarray | None = None,
               pair_margin: np.ndarray | None = None, rating_x: np.ndarray | None = None,
               rating_y: np.ndarray | None = None, l2: float = 1e-3, rating_coef: float = 1.0,
               max_iter: int = 500) -> tuple[np.ndarray, float, dict]:
    """Fit (w, b) on standardised features. Pairs: BT; ratings alone: closed-form least squares; both: joint."""
    has_pairs = pair_diff is not None and len(pair_diff) > 0
    has_ratings = rating_x is not None and len(rating_x) > 0
    if not has_pairs and not has_ratings:
        raise UserError("data.train: no pairs or ratings to fit the linear reward model on")
    if has_ratings and not has_pairs:
        Z = torch.as_tensor(rating_x, dtype=torch.float64)  # (N, D)
        y = torch.as_tensor(rating_y, dtype=torch.float64)  # (N,)
        zc, yc = Z - Z.mean(0), y - y.mean()
        n, d = Z.shape
        w = torch.linalg.solve(zc.T @ zc / n + l2 * torch.eye(d, dtype=torch.float64), zc.T @ yc / n)
        b = float(y.mean() - Z.mean(0) @ w)
        mse = float(((Z @ w + b - y) ** 2).mean())
        return w.numpy(), b, {"solver": "least_squares", "train_mse": mse}
    D = pair_diff.shape[1]
    diff = torch.as_tensor(pair_diff, dtype=torch.float64)
    target = torch.as_tensor(pair_target if pair_target is not None else np.ones(len(diff)), dtype=torch.float64)
    margin = torch.as_tensor(pair_margin if pair_margin is not None else np.zeros(len(diff)), dtype=torch.float64)
    params = torch.zeros(D + 1, dtype=torch.float64, requires_grad=True)  # w and b (b only matters for ratings)
    if has_ratings:
        Z = torch.as_tensor(rating_x, dtype=torch.float64)
        y = torch.as_tensor(rating_y, dtype=torch.float64)

    def objective(p: torch.Tensor) -> torch.Tensor:
        w, b = p[:D], p[D]
        loss = bt_objective(w, diff, target, margin) + 0.5 * l2 * (w @ w)
        if has_ratings:
            loss = loss + rating_coef * 0.5 * ((Z @ w + b - y) ** 2).mean()
        return loss

    evals = _lbfgs(objective, params, max_iter)
    final = params.detach().clone().requires_grad_(True)
    objective(final).backward()  # gradient norm at the solution: ~0 when L-BFGS converged
    w, b = params[:D].detach(), float(params[D].detach())
    with torch.no_grad():
        pref = target > 0.5
        stats = {"solver": "lbfgs", "function_evals": evals,
                 "train_bt_loss": float(bt_objective(w, diff, target, margin)),
                 "train_accuracy": float(((diff[pref] @ w) > 0).double().mean()) if pref.any() else float("nan"),
                 "grad_norm": float(final.grad.norm())}
    return w.numpy(), (b if has_ratings else 0.0), stats

def choose_l2(diff: np.ndarray, target: np.ndarray, margin: np.ndarray, grid: list[float], max_iter: int,
              seed: int, folds: int = 5) -> tuple[float, dict[float, float]]:
    """The l2 of `grid` with the lowest mean held-out BT loss over `folds` seeded folds of the training pairs."""
    fold_of = np.random.default_rng(seed + 2).permutation(len(diff)) % folds
    scores = {}
    for l2 in grid:
        losses = []
        for k in range(folds):
            tr, te = fold_of != k, fold_of == k
            w, _, _ = fit_linear(pair_diff=diff[tr], pair_target=target[tr], pair_margin=margin[tr], l2=l2,
                                 max_iter=max_iter)
            t = (torch.as_tensor(a[te], dtype=torch.float64) for a in (diff, target, margin))
            losses.append(float(bt_objective(torch.as_tensor(w), *t)))
        scores[float(l2)] = float(np.mean(losses))
    return min(scores, key=scores.get), scores


class LinearRewardModel:
    """R(prompt, completion) = (wᵀ(φ − μ)/σ + b − shift) / scale, φ from a cached feature extractor."""

    kind = "linear"

    def __init__(self, extractor: Extractor, weights: np.ndarray, bias: float, mean: np.ndarray, std: np.ndarray,
                 shift: float = 0.0, scale: float = 1.0, meta: dict | None = None, cache: FeatureCache | None = None):
        self.extractor, self.weights, self.bias = extractor, np.asarray(weights, np.float64), float(bias)
        self.mean, self.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        self.shift, self.scale = float(shift), float(scale)
        self.meta = dict(meta or {})
        self.cache = cache

    def features(self, prompts: Sequence[Any], completions: Sequence[Any], progress: bool = False) -> np.ndarray:
        """Standardised features z (N, D)."""
        phi = featurize(self.extractor, prompts, completions, self.cache, progress=progress)
        return (phi.astype(np.float64) - self.mean) / self.std

    def raw_scores(self, prompts: Sequence[Any], completions: Sequence[Any], progress: bool = False) -> np.ndarray:
        return self.features(prompts, completions, progress) @ self.weights + self.bias

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], progress: bool = False) -> list[float]:
        """Normalised scores, one per (prompt, completion)."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        if not len(prompts):
            return []
        raw = self.raw_scores(prompts, completions, progress)
        return [float(v) for v in (raw - self.shift) / self.scale]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ext = self.extractor
        meta = {"kind": "linear", "features": ext.spec, "context_chars": ext.context_chars,
                "pooling": getattr(ext, "pooling", None), "max_length": getattr(ext, "max_length", None),
                "feature_identity": ext.identity, "dim": int(len(self.weights)),
                "weights": [float(v) for v in self.weights], "bias": self.bias,
                "feature_mean": [float(v) for v in self.mean], "feature_std": [float(v) for v in self.std],
                "normalization": {"shift": self.shift, "scale": self.scale, **self.meta.get("normalization", {})},
                **{k: v for k, v in self.meta.items() if k != "normalization"}}
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", cache: FeatureCache | bool | None = None
             ) -> "LinearRewardModel":
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        try:
            ext = make_extractor(meta["features"], context_chars=meta.get("context_chars") or 0,
                                 pooling=meta.get("pooling") or "mean", max_length=meta.get("max_length") or 0,
                                 device=device)
            weights = np.asarray(meta["weights"], np.float64)
            mean, std = np.asarray(meta["feature_mean"]), np.asarray(meta["feature_std"])
            norm = meta.get("normalization", {})
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{folder / META_FILE}: not a valid linear reward model ({err})") from None
        if len(weights) != ext.dim or len(mean) != ext.dim or len(std) != ext.dim:
            raise UserError(f"{folder / META_FILE}: {len(weights)} weights but extractor {meta['features']!r} gives "
                            f"{ext.dim} features")
        if cache is True:
            cache = FeatureCache(ext)
        extra = {k: v for k, v in meta.items() if k in ("training", "data")}
        return cls(ext, weights, meta.get("bias", 0.0), mean, std, norm.get("shift", 0.0), norm.get("scale", 1.0),
                   meta=extra, cache=cache or None)
