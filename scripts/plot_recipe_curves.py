"""Plot the RL curves of a recipe run (reward and KL per update) as one PNG, for docs/recipes.md.

    python scripts/plot_recipe_curves.py runs/recipes/dialogue_hh docs/recipe_dialogue_hh.png

Reads RUN/round*/rl/metrics.jsonl (rlhfkit ppo / grpo / rloo metrics) and draws three panels against the update:
the raw score (`objective/score`: the reward model's or reward function's value), the KL to the reference
(`objective/kl`, nats per completion, k1 summed over tokens) and the completion length in tokens (`gen/length`).
Noisy per-update values are drawn thin with a 5-update moving average on top.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run: Path) -> list[dict]:
    rows, offset = [], 0
    for rd in sorted(run.glob("round*/rl/metrics.jsonl"), key=lambda p: int(p.parent.parent.name[5:])):
        part = [json.loads(x) for x in rd.read_text().splitlines() if x.strip()]
        rows += [{**m, "step": m["step"] + offset} for m in part]
        offset += part[-1]["step"] if part else 0
    if not rows:
        sys.exit(f"error: no round*/rl/metrics.jsonl under {run}")
    return rows


def smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    rows = read_metrics(run)
    steps = [r["step"] for r in rows]
    panels = [("objective/score", "score (reward)"), ("objective/kl", "KL to reference (nats)"),
              ("gen/length", "completion tokens")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.2))
    for ax, (key, label) in zip(axes, panels):
        ys = [r.get(key, float("nan")) for r in rows]
        ax.plot(steps, ys, color="#9ab", linewidth=0.8)
        ax.plot(steps, smooth(ys), color="#1f5f8b", linewidth=2)
        ax.set_xlabel("update")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(run.name, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out} ({len(rows)} updates)")


if __name__ == "__main__":
    main()
