"""Reward-model evaluation on preference pairs: accuracy, Bradley-Terry loss, calibration, length bias, plots.

All metrics read the raw score difference Δ = s_chosen − s_rejected (before the stored normalisation, whose scale
would change the probabilities), and P(chosen ≻ rejected) = σ(Δ) as the Bradley-Terry model says.

- accuracy: share of pairs with Δ > 0, a pair with Δ == 0 counting 1/2.
- bt_loss: mean −log σ(Δ) (log 2 ≈ 0.693 for a model that gives every pair the same score).
- ece: expected calibration error of the predicted winner: confidence c = max(σ(Δ), 1 − σ(Δ)) in 10 equal bins
  over [0.5, 1]; ECE = Σ_b (n_b / N) |accuracy_b − mean c_b| (Guo et al. 2017, on the pairwise task).
- length bias: accuracy when the chosen reply is longer vs shorter, accuracy by quartile of pair length, the
  accuracy of "longer wins" on the same pairs, and the correlation of scores with log length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))  # numerically stable σ


def _acc(diff: np.ndarray) -> float:
    return float(np.mean((diff > 0) + 0.5 * (diff == 0))) if len(diff) else float("nan")


def pairwise_metrics(chosen: Sequence[float], rejected: Sequence[float], chosen_len: Sequence[int] | None = None,
                     rejected_len: Sequence[int] | None = None, n_bins: int = 10) -> dict:
    """Metrics dict (JSON-ready) for paired raw scores; lengths (characters) enable the length-bias entries."""
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    diff = c - r  # (N,)
    n = len(diff)
    p = _sigmoid(diff)
    bt = float(np.mean(np.logaddexp(0.0, -diff)))  # −log σ(Δ) = log(1 + e^{−Δ})
    conf = np.maximum(p, 1 - p)
    correct = (diff > 0) + 0.5 * (diff == 0)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    bins, ece = [], 0.0
    for i in range(n_bins):
        hi_ok = conf <= edges[i + 1] if i == n_bins - 1 else conf < edges[i + 1]
        m = (conf >= edges[i]) & hi_ok
        if m.any():
            acc_b, conf_b = float(correct[m].mean()), float(conf[m].mean())
            ece += m.sum() / n * abs(acc_b - conf_b)
            bins.append({"range": [float(edges[i]), float(edges[i + 1])], "pairs": int(m.sum()),
                         "accuracy": acc_b, "confidence": conf_b})
    out = {"accuracy": _acc(diff), "pairs": int(n), "bt_loss": bt, "ece": float(ece),
           "mean_gap": float(diff.mean()) if n else float("nan"),
           "std_gap": float(diff.std()) if n else float("nan"),
           "score_ties": int((diff == 0).sum()), "reliability": bins,
           "mean_score_chosen": float(c.mean()) if n else float("nan"),
           "mean_score_rejected": float(r.mean()) if n else float("nan")}
    if chosen_len is not None and rejected_len is not None:
        cl, rl = np.asarray(chosen_len, np.float64), np.asarray(rejected_len, np.float64)
        groups = {"chosen_longer": cl > rl, "chosen_shorter": cl < rl, "same_length": cl == rl}
        out["accuracy_by_length_order"] = {k: {"pairs": int(m.sum()), "accuracy": _acc(diff[m])}
                                           for k, m in groups.items()}
        out["length_heuristic_accuracy"] = _acc(cl - rl)
        mean_len = (cl + rl) / 2
        qs = np.quantile(mean_len, [0, 0.25, 0.5, 0.75, 1.0]) if n else np.zeros(5)
        buckets = []
        for i in range(4):
            m = (mean_len >= qs[i]) & ((mean_len <= qs[i + 1]) if i == 3 else (mean_len < qs[i + 1]))
            buckets.append({"chars": [float(qs[i]), float(qs[i + 1])], "pairs": int(m.sum()), "accuracy": _acc(diff[m])})
        out["accuracy_by_length"] = buckets
        scores, lengths = np.concatenate([c, r]), np.log1p(np.concatenate([cl, rl]))
        if n > 1 and scores.std() > 0 and lengths.std() > 0:
            out["score_log_length_corr"] = float(np.corrcoef(scores, lengths)[0, 1])
    return out


def write_plots(metrics: dict, diff: Sequence[float], prefix: str | Path) -> dict[str, str]:
    """Reliability diagram, score-gap histogram and accuracy-by-length chart as PNGs named PREFIX_*.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = Path(prefix)
    paths = {}

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = metrics["reliability"]
    ax.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfect calibration")
    if bins:
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="model")
        for b in bins:
            ax.annotate(str(b["pairs"]), (b["confidence"], b["accuracy"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    ax.set(xlabel="confidence max(σ(Δ), 1−σ(Δ))", ylabel="accuracy", xlim=(0.5, 1), ylim=(0, 1),
           title=f"reliability (ECE {metrics['ece']:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    paths["reliability"] = _save(fig, prefix.with_name(prefix.name + "_reliability.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    d = np.asarray(diff, np.float64)
    ax.hist(d, bins=min(50, max(5, len(d) // 10)), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="black", lw=1)
    ax.set(xlabel="score gap s_chosen − s_rejected (raw)", ylabel="pairs",
           title=f"score gaps: accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs")
    paths["score_gap"] = _save(fig, prefix.with_name(prefix.name + "_score_gap.png"))

    if "accuracy_by_length" in metrics:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        buckets = metrics["accuracy_by_length"]
        order = metrics["accuracy_by_length_order"]
        labels = [f"{b['chars'][0]:.0f}-{b['chars'][1]:.0f}" for b in buckets] + ["chosen\nlonger", "chosen\nshorter"]
        values = [b["accuracy"] for b in buckets] + [order["chosen_longer"]["accuracy"],
                                                    order["chosen_shorter"]["accuracy"]]
        counts = [b["pairs"] for b in buckets] + [order["chosen_longer"]["pairs"], order["chosen_shorter"]["pairs"]]
        colors = ["tab:blue"] * len(buckets) + ["tab:orange"] * 2
        ax.bar(range(len(values)), [0 if math.isnan(v) else v for v in values], color=colors)
        for i, (v, k) in enumerate(zip(values, counts)):
            ax.text(i, (0 if math.isnan(v) else v) + 0.01, f"n={k}", ha="center", fontsize=7)
        ax.axhline(0.5, color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set(ylabel="accuracy", ylim=(0, 1), title="accuracy by mean reply length (chars) and length order")
        paths["length"] = _save(fig, prefix.with_name(prefix.name + "_length.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
