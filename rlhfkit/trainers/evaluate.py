"""Compare two policies on held-out prompts: win rate judged by a Python function and/or a reward model, mean
score, KL to a reference policy, distinct-n diversity, length, and chrF/BLEU against references (translation).

    rlhfkit eval a.model=runs/ppo/model b.model=stories260k judge.function=rlhfkit.gold:sentiment output=e.json
    rlhfkit eval a.model=runs/ppo/model b.model=stories260k judge.model=runs/rm      # a reward model judges
    rlhfkit eval a.samples=tuned.jsonl b.samples=base.jsonl judge.function=my.py:score output=out.json

A policy is a model (sampled here, `num_samples` completions per prompt with `gen.*` and `seed`) or a samples file
({"prompt", "completions": [...]} as `rlhfkit generate` writes, or {"prompt", "completion"}). Win rate of A over B:
the j-th completion of A for prompt i against the j-th of B for the same prompt; a win counts 1, a tie ½ (Elo
convention), and the standard error is that of the mean over those comparisons. KL(A || ref) is the k1 estimate
Σ_t log π_A(y_t) − log π_ref(y_t) over A's own samples (nats per completion; logits divided by gen.temperature,
as in the RL trainers), so it needs A as a model; ref defaults to B's model. distinct-n (Li et al., 2016) is the
number of distinct word n-grams over all of a policy's completions divided by their total count. chrF and BLEU
(sacrebleu, corpus level) are computed when prompt records carry a "reference" string (or "references", a list).
Writes OUTPUT (JSON), OUTPUT_STEM_samples.jsonl and, with report=true, OUTPUT_STEM.html (one self-contained file).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.config import GenConfig, atomic_write_text
from rlhfkit.errors import UserError


@dataclass
class PolicySpec:
    model: str = ""
    """Model to sample from: stories260k, a hub id or a model folder (e.g. runs/ppo/model)."""
    samples: str = ""
    """Instead of a model: a JSONL of {"prompt", "completions": [...]} or {"prompt", "completion"}, one row per
    prompt of data.prompts, in the same order (rows are matched to prompts by position)."""
    name: str = ""
    """Name shown in the report (default: A is "tuned", B is "base")."""


@dataclass
class JudgeSpec:
    function: str = ""
    """Python judge fn(prompts, completions, **columns) -> list[float] (MODULE:FN or FILE.py:FN), e.g. the demo's
    gold preference rlhfkit.gold:sentiment."""
    model: str = ""
    """Reward model folder (from `rlhfkit rm train`) as a judge; with judge.function both are reported and the
    function decides `win_rate`."""


@dataclass
class EvalDataConfig:
    prompts: str = "bundled:tinystories_eval_prompts.jsonl"
    """Held-out prompts: JSONL of {"prompt"} or {"messages"}; a "reference" field enables chrF/BLEU."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""


@dataclass
class EvalConfig:
    a: PolicySpec = field(default_factory=PolicySpec)
    """Policy A (the tuned one)."""
    b: PolicySpec = field(default_factory=PolicySpec)
    """Policy B (the base); leave empty to evaluate A alone (no win rate)."""
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=48, temperature=1.0))
    """Sampling for model policies (temperature 1 matches the RL trainers' sampling, so KL is comparable)."""
    num_samples: int = 1
    """Completions per prompt and policy."""
    reference: str = ""
    """Reference model for KL(A || ref); empty: B's model (no KL when B is a samples file)."""
    tokenizer: str = ""
    """Tokenizer for all models; empty: each model's own."""
    output: str = "runs/eval/eval.json"
    """Metrics JSON; samples go to OUTPUT_STEM_samples.jsonl and the report to OUTPUT_STEM.html."""
    report: bool = True
    """Write the HTML report next to the JSON."""
    samples_shown: int = 12
    """Prompts shown side by side in the report."""
    seed: int = 0
    """Sampling seed (the same for A and B, so their i-th samples share random numbers)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto."""
    batch_size: int = 32
    """Sequences per forward pass for the KL and the reward model."""
    progress: bool = True
    """Show progress bars on stderr."""

    def validate(self) -> None:
        if bool(self.a.model) == bool(self.a.samples):
            raise UserError("a: give exactly one of a.model=MODEL and a.samples=FILE")
        if self.b.model and self.b.samples:
            raise UserError("b: give at most one of b.model=MODEL and b.samples=FILE")
        if not (self.judge.function or self.judge.model):
            raise UserError("judge: give judge.function=MODULE:FN (or FILE.py:FN) and/or judge.model=RM_DIR")
        if self.num_samples < 1 or self.batch_size < 1 or self.data.limit < 0:
            raise UserError("num_samples and batch_size: must be >= 1; data.limit >= 0")
        if not self.output:
            raise UserError("output: required (a .json file)")


# ----------------------------------------------------------------------------------------------------------------
# Metrics (pure functions; tested on hand-made inputs)

_WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _WORDS.findall(text.lower())


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over every text (corpus level); 0 when there are none.
    ["a b a b", "a c"], n=1: 6 unigrams, 3 distinct -> 0.5; n=2: ab ba ab ac -> 3/4."""
    grams: Counter = Counter()
    for t in texts:
        w = words(t)
        grams.update(tuple(w[i: i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def win_rate(scores_a: list[float], scores_b: list[float]) -> dict:
    """Win rate of A over B on paired scores: wins + ½ ties over n, with the standard error of that mean.
    [3, 1, 2] vs [1, 1, 5]: win, tie, loss -> (1 + 0.5 + 0) / 3 = 0.5."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate: needs two non-empty lists of equal length")
    outcome = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]
    n = len(outcome)
    mean = sum(outcome) / n
    var = sum((o - mean) ** 2 for o in outcome) / max(1, n - 1)
    return {"win_rate": mean, "stderr": math.sqrt(var / n), "wins": outcome.count(1.0),
            "ties": outcome.count(0.5), "losses": outcome.count(0.0), "n": n}


def text_metrics(completions: list[str]) -> dict:
    """Length and diversity of a list of completions."""
    n_words = [len(words(c)) for c in completions]
    return {"length_words": sum(n_words) / max(1, len(n_words)),
            "length_chars": sum(len(c) for c in completions) / max(1, len(completions)),
            **{f"distinct_{k}": distinct_n(completions, k) for k in (1, 2, 3)}}


def references_of(extra: dict) -> list[str] | None:
    if isinstance(extra.get("reference"), str):
        return [extra["reference"]]
    refs = extra.get("references")
    if isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs):
        return refs
    return None


def translation_metrics(completions: list[str], references: list[list[str]]) -> dict:
    """Corpus chrF and BLEU (sacrebleu defaults) of completions against their references (any count each)."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("chrF/BLEU need the package sacrebleu (pip install sacrebleu)") from None
    hyps = [c.strip() for c in completions]
    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]
    return {"chrf": float(sacrebleu.corpus_chrf(hyps, streams).score),
            "bleu": float(sacrebleu.corpus_bleu(hyps, streams).score)}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Sampling, scoring, KL


@dataclass
class PolicySamples:
    name: str
    completions: list[str]
    """len(prompts) * num_samples, prompt-major (prompt i's samples at i*k .. i*k+k-1)."""
    model: Any = None
    tokenizer: Any = None
    prompt_ids: list | None = None
    completion_ids: list | None = None


def _samples_from_file(path: str, n_prompts: int, k: int, what: str) -> list[str]:
    from rlhfkit.data import read_records

    recs = read_records(path)
    if len(recs) < n_prompts:
        raise UserError(f"{what}: {path} has {len(recs)} rows for {n_prompts} prompts")
    out = []
    for rec in recs[:n_prompts]:
        d = rec.data
        comps = d.get("completions", [d["completion"]] if "completion" in d else None)
        if not isinstance(comps, list) or len(comps) < k or not all(isinstance(c, str) for c in comps[:k]):
            raise UserError(f"{rec.where}: field 'completions': expected a list of at least {k} strings "
                            "(num_samples)")
        out.extend(comps[:k])
    return out


def sample_policy(spec: PolicySpec, name: str, prompts: list, cfg: EvalConfig, device, key: str) -> PolicySamples:
    """Completions of policy `key` (a or b): read from spec.samples, or sampled from spec.model."""
    from rlhfkit import models as M
    from rlhfkit.config import ModelConfig
    from rlhfkit.rollout import sample
    from rlhfkit.train_utils import progress

    k = cfg.num_samples
    if spec.samples:
        return PolicySamples(name, _samples_from_file(spec.samples, len(prompts), k, f"{name}.samples"))
    tok = M.load_tokenizer(cfg.tokenizer, key="tokenizer") if cfg.tokenizer else \
        M.load_tokenizer(spec.model, key=f"{key}.model")
    model = M.load_causal_lm(ModelConfig(name=spec.model), device, key=f"{key}.model").eval()
    ids = [M.encode_prompt(tok, p) for p in prompts for _ in range(k)]
    bar = progress(len(ids), f"eval: sample {name}", cfg.progress, unit="seq")
    s = sample(model, tok, ids, cfg.gen, seed=cfg.seed, progress=bar)
    bar.close()
    texts = [M.decode_completion(tok, c, p) for c, p in zip(s.completion_ids, s.prompt_ids)]
    return PolicySamples(name, texts, model, tok, s.prompt_ids, s.completion_ids)


def kl_to_reference(pol: PolicySamples, ref_model: Any, cfg: EvalConfig) -> list[float]:
    """Per-completion Σ_t log π(y_t) − log π_ref(y_t) on the policy's own samples (k1; nats)."""
    import torch

    from rlhfkit import rl as R

    temperature = R.sampling_temperature(cfg.gen)
    tok = pol.tokenizer
    out: list[float] = []
    n = len(pol.completion_ids)
    for i in range(0, n, cfg.batch_size):
        batch = R.make_rollout_batch(pol.prompt_ids[i: i + cfg.batch_size], pol.completion_ids[i: i + cfg.batch_size],
                                     None, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, prompts=[],
                                     completions=[])
        batch = batch.to(next(pol.model.parameters()).device)
        with torch.no_grad():
            lp, _ = R.forward_logprobs(pol.model, batch, temperature)
            ref, _ = R.forward_logprobs(ref_model, batch, temperature)
        out.extend(R.per_sequence_sum(lp - ref, batch.completion_mask).tolist())
    return out


def make_judges(cfg: EvalConfig, device) -> dict[str, Any]:
    """name -> scorer with .score(prompts, completions, columns); the function judge comes first."""
    from rlhfkit import scoring as S

    judges: dict[str, Any] = {}
    if cfg.judge.function:
        judges["function"] = S.FunctionScorer(cfg.judge.function)
    if cfg.judge.model:
        judges["reward_model"] = S.ModelScorer(_load_rm(cfg.judge.model, device, cfg.batch_size),
                                               f"judge.model {cfg.judge.model}")
    return judges


def _load_rm(path: str, device, batch_size: int) -> Any:
    from rlhfkit.reward import load_reward_model

    rm = load_reward_model(path, str(device), key="judge.model")
    rm.batch_size = batch_size
    return rm


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def evaluate(cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Run the evaluation; returns (metrics, per-comparison rows)."""
    from rlhfkit import models as M
    from rlhfkit.config import ModelConfig
    from rlhfkit.data import load_prompts
    from rlhfkit.train_utils import seed_everything

    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    device = M.pick_device(cfg.device)
    records = load_prompts(cfg.data.prompts)
    if cfg.data.limit:
        records = records[: cfg.data.limit]
    if not records:
        raise UserError(f"data.prompts: {cfg.data.prompts} has no prompts")
    k = cfg.num_samples
    prompts = [r.prompt for r in records]
    flat_prompts = [p for p in prompts for _ in range(k)]
    columns = {key: [r.extra.get(key) for r in records for _ in range(k)] for key in records[0].extra}
    policies = {"a": sample_policy(cfg.a, cfg.a.name or "tuned", prompts, cfg, device, "a")}
    if cfg.b.model or cfg.b.samples:
        policies["b"] = sample_policy(cfg.b, cfg.b.name or "base", prompts, cfg, device, "b")

    judges = make_judges(cfg, device)
    scores: dict[str, dict[str, list[float]]] = {key: {} for key in policies}
    for key, pol in policies.items():
        for jname, judge in judges.items():
            scores[key][jname] = judge.score(flat_prompts, pol.completions, columns)

    refs = [references_of(r.extra) for r in records]
    result: dict[str, Any] = {"prompts": len(records), "num_samples": k, "data": cfg.data.prompts,
                              "judges": {"function": cfg.judge.function, "reward_model": cfg.judge.model},
                              "policies": {}}
    ref_name = cfg.reference or cfg.b.model
    kls = None
    if ref_name and policies["a"].model is not None:
        ref_model = M.load_causal_lm(ModelConfig(name=ref_name), device,
                                     key="reference" if cfg.reference else "b.model").eval()
        kls = kl_to_reference(policies["a"], ref_model, cfg)
    for key, pol in policies.items():
        spec = cfg.a if key == "a" else cfg.b
        entry = {"name": pol.name, "source": spec.model or spec.samples, **text_metrics(pol.completions),
                 "scores": {j: mean(v) for j, v in scores[key].items()}}
        if pol.completion_ids is not None:
            entry["length_tokens"] = mean([float(len(c)) for c in pol.completion_ids])
        if key == "a" and kls is not None:
            entry["kl"], entry["kl_reference"] = mean(kls), ref_name
        if all(r is not None for r in refs):
            entry.update(translation_metrics(pol.completions, [r for r in refs for _ in range(k)]))
        result["policies"][key] = entry
    if "b" in policies:
        result["win_rate"] = {j: win_rate(scores["a"][j], scores["b"][j]) for j in judges}
        result["judge"] = next(iter(judges))
    rows = []
    for i, p in enumerate(flat_prompts):
        row = {"prompt": p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)}
        for key, pol in policies.items():
            row[key] = pol.completions[i]
            row[f"{key}_scores"] = {j: round(v[i], 4) for j, v in scores[key].items()}
        if kls is not None:
            row["a_kl"] = round(kls[i], 4)
        rows.append(row)
    result["seconds"] = time.perf_counter() - t0
    return result, rows


def paths_for(output: str | Path) -> tuple[Path, Path, Path]:
    """(JSON, samples JSONL, HTML report) paths of an eval output."""
    out = Path(output)
    stem = out.with_suffix("")
    return out, stem.with_name(stem.name + "_samples.jsonl"), stem.with_suffix(".html")


def main(cfg: EvalConfig, argv: list[str] | None = None) -> dict:
    from rlhfkit.data import write_jsonl

    result, rows = evaluate(cfg)
    out, samples_path, html_path = paths_for(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(samples_path, rows)
    result["samples_file"] = str(samples_path)
    if cfg.report:
        from rlhfkit.report import eval_report

        atomic_write_text(html_path, eval_report(result, rows, cfg.samples_shown))
        result["report"] = str(html_path)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(format_summary(result))
    print(f"eval: wrote {out}" + (f" and {html_path}" if cfg.report else ""))
    return result


def format_summary(result: dict) -> str:
    """A few terminal lines: scores per policy, win rate, KL, diversity."""
    lines = []
    pols = result["policies"]
    for key, p in pols.items():
        s = ", ".join(f"{j} {v:.4f}" for j, v in p["scores"].items())
        extra = f", KL {p['kl']:.3f}" if "kl" in p else ""
        mt = f", chrF {p['chrf']:.2f}, BLEU {p['bleu']:.2f}" if "chrf" in p else ""
        lines.append(f"eval: {p['name']:>6}: mean score {s}; {p['length_words']:.1f} words, distinct-2 "
                     f"{p['distinct_2']:.3f}{extra}{mt}")
    for j, w in result.get("win_rate", {}).items():
        lines.append(f"eval: win rate of {pols['a']['name']} over {pols['b']['name']} by {j}: {w['win_rate']:.3f} "
                     f"± {w['stderr']:.3f} ({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
    return "\n".join(lines)
