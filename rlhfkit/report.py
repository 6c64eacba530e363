"""Self-contained HTML reports: one file, inline CSS, plots embedded as base64 PNG (matplotlib, Agg), no scripts and
no external URLs, so a report can be mailed or opened offline.

    html = eval_report(result, rows)                 # `rlhfkit eval`
    html = pipeline_report(data)                     # `rlhfkit demo` / `rlhfkit pipeline`: the whole RLHF loop

Every piece of text from data or models goes through html.escape.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Sequence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1.05rem}
table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;
vertical-align:top} th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666;font-size:.9rem} figure{margin:1rem 0} figcaption{color:#555;font-size:.9rem;max-width:900px}
img{max-width:100%} .samples td{width:33%;white-space:pre-wrap;font-size:.92rem} .big{font-size:1.15rem}
.score{color:#555;font-size:.85rem;white-space:nowrap} .win{background:#eefbea} .loss{background:#fdeeee}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers rounded for tables; None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


class Report:
    """Builds one HTML page from headings, paragraphs, tables, figures and sample tables."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.parts: list[str] = [f"<h1>{esc(title)}</h1>"]
        if subtitle:
            self.parts.append(f'<p class="muted">{esc(subtitle)}</p>')

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{esc(text)}</h{level}>")

    def paragraph(self, text: str, cls: str = "") -> None:
        self.parts.append(f'<p{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{esc(text)}</p>')

    def table(self, header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> None:
        """header None: no header row."""
        head = "".join(f"<th>{esc(h)}</th>" for h in header or ())
        body = []
        for row in rows:
            cells = "".join(f'<td class="num">{esc(fmt(c))}</td>' if isinstance(c, (int, float)) and
                            not isinstance(c, bool) else f"<td>{esc(fmt(c))}</td>" for c in row)
            body.append(f"<tr>{cells}</tr>")
        self.parts.append(f"<table>{f'<tr>{head}</tr>' if head else ''}{''.join(body)}</table>")

    def figure(self, fig: Any, caption: str = "") -> None:
        """Embed a matplotlib Figure as a base64 PNG."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img alt="{esc(caption or "plot")}" src="data:image/png;base64,{data}">{cap}'
                          "</figure>")

    def samples(self, rows: list[dict], columns: list[tuple[str, str]], score_key: str | None = None) -> None:
        """Side-by-side completions: rows of {"prompt", col: text, col + "_score": number}; with score_key the
        row is shaded by whether the first completion column beat the second."""
        head = "<th>prompt</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in columns)
        body = []
        for r in rows:
            cls = ""
            if score_key and len(columns) == 2:
                a, b = (r.get(f"{c}_score") for c, _ in columns)
                if a is not None and b is not None and a != b:
                    cls = ' class="win"' if a > b else ' class="loss"'
            cells = [f"<td>{esc(r.get('prompt', ''))}</td>"]
            for c, _ in columns:
                s = r.get(f"{c}_score")
                score = f'<br><span class="score">{esc(score_key or "score")} {esc(fmt(s, 3))}</span>' \
                    if s is not None else ""
                cells.append(f"<td>{esc(r.get(c, ''))}{score}</td>")
            body.append(f"<tr{cls}>{''.join(cells)}</tr>")
        self.parts.append(f'<table class="samples"><tr>{head}</tr>{"".join(body)}</table>')

    def html(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, safe in threads and without a display)


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def line_figure(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = ""):
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return fig


def curves_figure(steps: list, panels: list[tuple[str, list]], title: str = ""):
    """Stacked panels sharing the x axis (update step): [(ylabel, values)]."""
    fig = _figure(6.4, 1.9 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, values) in zip(axes, panels):
        pts = [(s, v) for s, v in zip(steps, values) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("update")
    if title:
        axes[0].set_title(title)
    return fig


def overoptimisation_figure(kl: list[float], gold: list[float], proxy: list[float], gold_label: str,
                            proxy_label: str):
    """Gold score and learned reward (two y axes) against KL from the reference policy."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(kl, gold, marker="o", color="tab:green", label=gold_label)
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel(gold_label, color="tab:green")
    ax2 = ax.twinx()
    ax2.plot(kl, proxy, marker="s", color="tab:blue", label=proxy_label)
    ax2.set_ylabel(proxy_label, color="tab:blue")
    ax.grid(alpha=0.3)
    return fig


def histogram_figure(values: dict[str, list[float]], xlabel: str, title: str = ""):
    fig = _figure()
    ax = fig.add_subplot()
    finite = [v for vs in values.values() for v in vs if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    bins = [lo + (hi - lo) * i / 24 for i in range(25)] if hi > lo else 10
    for label, vs in values.items():
        ax.hist(vs, bins=bins, alpha=0.55, label=f"{label} (mean {sum(vs) / max(1, len(vs)):.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("completions")
    if title:
        ax.set_title(title)
    ax.legend()
    return fig


def scatter_figure(x: list[float], y: list[float], xlabel: str, ylabel: str, title: str = ""):
    fig = _figure(5.0, 3.8)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=8, alpha=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Reports

CURVES = (("objective/score", "reward-model score"), ("objective/kl", "KL (nats)"), ("objective/kl_coef", "β"),
          ("gen/length", "length (tokens)"), ("objective/entropy", "entropy (nats)"), ("loss/train", "loss"),
          ("rewards/accuracies", "pair accuracy"), ("rewards/margins", "implicit reward margin"))
"""metrics.jsonl keys drawn as training curves (PPO-style and DPO-style trainers), when present and not constant."""


def _eval_section(rep: Report, result: dict, rows: list[dict], shown: int, labels: dict | None = None) -> None:
    """Tables (per policy; win rates), the score histogram and the side-by-side samples of an eval result.
    labels: display names of the judges ("function", "reward_model")."""
    pols = result["policies"]
    judges = list(next(iter(pols.values()))["scores"])
    names = {"function": f"judge {result['judges'].get('function') or ''}".strip(), "reward_model": "reward model",
             **(labels or {})}
    header = ["policy", "source"] + [f"mean score: {names[j]}" for j in judges] + [
        "KL to ref", "words", "distinct-1", "distinct-2", "distinct-3"]
    has_mt = any("chrf" in p for p in pols.values())
    if has_mt:
        header += ["chrF", "BLEU"]
    table = []
    for p in pols.values():
        row = [p["name"], p["source"]] + [p["scores"][j] for j in judges] + [
            p.get("kl"), p["length_words"], p["distinct_1"], p["distinct_2"], p["distinct_3"]]
        if has_mt:
            row += [p.get("chrf"), p.get("bleu")]
        table.append(row)
    rep.table(header, table)
    j = result.get("judge", judges[0])
    if "win_rate" in result:
        a, b = pols["a"]["name"], pols["b"]["name"]
        rep.table(["judge", f"win rate of {a} over {b}", "± s.e.", "wins", "ties", "losses", "comparisons"],
                  [[names[k], w["win_rate"], w["stderr"], w["wins"], w["ties"], w["losses"], w["n"]]
                   for k, w in result["win_rate"].items()])
        rep.figure(histogram_figure({pols[k]["name"]: [r[f"{k}_scores"][j] for r in rows] for k in pols},
                                    names[j], "Score distribution on held-out prompts"),
                   f"Scores ({names[j]}) of every held-out completion of each policy.")
        shown_rows = [{"prompt": r["prompt"], "a": r["a"], "b": r["b"], "a_score": r["a_scores"][j],
                       "b_score": r["b_scores"][j]} for r in rows[:shown]]
        rep.heading(f"Samples side by side (first {len(shown_rows)}; green: {a} wins by {names[j]}, red: it "
                    "loses)", 3)
        rep.samples(shown_rows, [("a", a), ("b", b)], score_key=names[j])
    else:
        rep.samples([{"prompt": r["prompt"], "a": r["a"], "a_score": r["a_scores"][j]} for r in rows[:shown]],
                    [("a", pols["a"]["name"])], score_key=names[j])


def eval_report(result: dict, rows: list[dict], shown: int = 12) -> str:
    """The `rlhfkit eval` report."""
    judges = ", ".join(f"{k} {v}" for k, v in result["judges"].items() if v)
    rep = Report("rlhfkit eval", f"{result['prompts']} prompts from {result['data']}, {result['num_samples']} "
                                 f"sample(s) each; judges: {judges}")
    _eval_section(rep, result, rows, shown)
    return rep.html()


def pipeline_report(data: dict) -> str:
    """The RLHF-loop report (demo and pipeline). `data` keys (all optional but summary):
    summary (summary.json), stages [{name, seconds}], rm {accuracy, gold_accuracy, pairs, scatter: (gold, rm)},
    rl_metrics [metrics.jsonl rows], overopt [{step, kl, gold, proxy}], eval (eval result), eval_rows."""
    s = data["summary"]
    rep = Report(data.get("title", "rlhfkit: the RLHF loop"), data.get("subtitle", ""))
    rep.heading("Result")
    gold = data.get("gold_label", "gold score")
    head = []
    if "gold_score_before" in s:
        head.append([f"{gold}, base → tuned ({s.get('eval_prompts')} held-out prompts)",
                     f"{s['gold_score_before']:.3f} → {s['gold_score_after']:.3f}"])
    if "win_rate" in s:
        head.append([f"win rate of tuned over base ({s.get('win_rate_judge')})",
                     f"{s['win_rate']:.3f} ± {s['win_rate_stderr']:.3f} ({s.get('eval_comparisons')} comparisons)"])
    if s.get("rm_accuracy") is not None:
        gold_acc = f", {s['rm_gold_accuracy']:.3f} vs gold" if "rm_gold_accuracy" in s else ""
        head.append(["reward model held-out accuracy", f"{s['rm_accuracy']:.3f} vs crowd labels{gold_acc}"])
    if s.get("kl") is not None:
        head.append(["KL(tuned ‖ base)", f"{s['kl']:.2f} nats per completion"])
    if "distinct_2_before" in s:
        head.append(["distinct-2, base → tuned", f"{s['distinct_2_before']:.3f} → {s['distinct_2_after']:.3f}"])
    head.append(["wall time", f"{s['seconds']:.0f} s"])
    rep.table(None, head)
    for line in data.get("notes", []):
        rep.paragraph(line, "muted")
    if data.get("stages"):
        rep.heading("Stages", 3)
        rep.table(["stage", "seconds", "status"], [[st["name"], round(st["seconds"], 1), st.get("status", "")]
                                                   for st in data["stages"]])

    rm = data.get("rm")
    if rm:
        rep.heading("Reward model")
        rep.table(["quantity", "value"], [[k.replace("_", " "), v] for k, v in rm.items()
                                          if isinstance(v, (int, float, str))])
        if rm.get("scatter"):
            gold, proxy = rm["scatter"]
            rep.figure(scatter_figure(gold, proxy, data.get("gold_label", "gold score"), "reward model score",
                                      "Learned reward vs gold on held-out completions"),
                       "Each dot is one completion of the reward model's held-out pairs. Held-out accuracy counts the "
                       "pairs it orders like the crowd's label (vs gold: like the noise-free gold function).")

    metrics = data.get("rl_metrics") or []
    if metrics:
        rep.heading("Training curves")
        steps = [m["step"] for m in metrics]
        panels = []
        for key, label in CURVES:
            values = [m.get(key) for m in metrics]
            if len({v for v in values if v is not None}) > 1:  # constant series (a fixed β, ...) are left out
                panels.append((label, values))
        if panels:
            rep.figure(curves_figure(steps, panels), "Per update of the RL stage (rounds joined end to end); the "
                       "reward-model score is the raw score of the sampled completions, KL the sum over their tokens.")

    over = data.get("overopt") or []
    if over:
        rep.heading("Gold score vs learned reward as KL grows")
        rep.figure(overoptimisation_figure([o["kl"] for o in over], [o["gold"] for o in over],
                                           [o["proxy"] for o in over], data.get("gold_label", "gold score"),
                                           "reward-model score"),
                   "Each point is the base policy or an RL checkpoint, sampled on held-out prompts: its mean gold "
                   "score and reward-model score against its KL to the base. While both rise the learned reward is "
                   "a good proxy; a reward-model score that keeps rising while the gold score stalls or falls is "
                   "overoptimisation (Gao et al., 2022, Scaling Laws for Reward Model Overoptimization).")
    elif data.get("overopt_note"):
        rep.heading("Gold score vs learned reward as KL grows")
        rep.paragraph(data["overopt_note"], "muted")

    if data.get("eval"):
        rep.heading("Held-out evaluation: tuned vs base")
        _eval_section(rep, data["eval"], data.get("eval_rows", []), data.get("samples_shown", 12),
                      {"function": data.get("gold_label", "gold score")})
    rep.heading("All numbers (summary.json)")
    rep.table(["key", "value"], [[k, v] for k, v in s.items() if isinstance(v, (int, float, str))])
    return rep.html()
