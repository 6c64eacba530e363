"""Reward models: train (linear R = wᵀφ or a deep scalar-head transformer), evaluate on pairs, score JSONL files.

    rlhfkit rm train model.kind=linear model.features=minilm data.train=prefs.jsonl run.output_dir=runs/rm_lin
    rlhfkit rm train model.kind=deep model.name=stories260k data.train=prefs.jsonl run.output_dir=runs/rm
    rlhfkit rm eval model.path=runs/rm data.eval=heldout.jsonl output=runs/rm/heldout.json
    rlhfkit rm score model.path=runs/rm input=samples.jsonl output=samples.scored.jsonl

Data: any preference format (rlhfkit.data.formats, Anthropic HH .jsonl.gz as is), rating files
{"prompt","completion","score"} or edit files. Pairs with chosen == rejected are dropped, duplicates kept (each is
a vote; a duplicate never straddles the train/eval split), both_bad pairs skipped (they say nothing about the
order), ties trained towards equal scores (BT target ½; train.ties=skip drops them); all counted in the log.
Without data.eval a data.eval_fraction share of the pairs (by data.split_seed) is held out.
The model lands in run.output_dir/model (a transformers folder + reward_model.json for deep models, a
reward_model.json for linear ones); `rlhfkit.reward.load_reward_model(run.output_dir)` loads either.
After training, scores are shifted (and with train.normalize_std scaled) so that they have mean 0 (std 1) on the
reference set data.normalize_on (default: the training completions), as lm-human-preferences does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rlhfkit.config import ModelConfig, OptimConfig, RunConfig, atomic_write_text
from rlhfkit.data import check_jsonl_output, load_preferences, read_records
from rlhfkit.errors import UserError, exact_div
from rlhfkit.reward.data import RMData, load_rm_data, reference_set, scoring_records


@dataclass
class RMModelConfig(ModelConfig):
    kind: Literal["linear", "deep"] = "deep"
    """linear: R = wᵀφ(x) over model.features; deep: model.name with a scalar head trained end to end."""
    features: str = "minilm"
    """Linear models: length, handcrafted, minilm, minilm:PATH (a sentence-transformers folder) or lm:NAME_OR_PATH
    (pooled hidden states of a frozen transformers model)."""
    pooling: Literal["mean", "last"] = "mean"
    """lm:NAME features: mean over tokens or the last real token."""
    context_chars: int = 400
    """Embedding features read the last N characters of the prompt + the completion (0: completion only; -1: all)."""
    feature_max_length: int = 0
    """Token limit of embedding features (texts are cut from the left); 0 = the encoder's own (256)."""
    train_layers: int = 0
    """Deep models: train only the top N transformer layers (+ the head and final norm); 0 trains all. Frozen
    bottom layers need no backward pass (about 2x faster on CPU for N = half the layers)."""

    def validate(self) -> None:
        super().validate()
        if not self.features:
            raise UserError("model.features: must not be empty")
        if self.context_chars < -1:
            raise UserError(f"model.context_chars: must be >= -1, got {self.context_chars}")
        if self.train_layers < 0:
            raise UserError(f"model.train_layers: must be >= 0, got {self.train_layers}")
        if self.feature_max_length < 0:
            raise UserError(f"model.feature_max_length: must be >= 0, got {self.feature_max_length}")


@dataclass
class RMDataConfig:
    train: str = ""
    """Training data: preference pairs (any format, incl. Anthropic HH .jsonl.gz), ratings or edits."""
    ratings: str = ""
    """Optional extra rating file {"prompt","completion","score"} trained together with the pairs of data.train."""
    eval: str = ""
    """Held-out preference pairs; empty holds out data.eval_fraction of data.train."""
    eval_fraction: float = 0.2
    """Share of the data.train pairs held out for evaluation when data.eval is empty (0 disables)."""
    split_seed: int = 0
    """Seed of the held-out split (separate from run.seed so every run sees the same split)."""
    max_length: int = 512
    """Deep models: longest prompt + completion in tokens; longer texts lose the start of the prompt."""
    normalize_on: str = "train"
    """Reference set for score normalisation: train (the training completions), none, or a file of
    prompt/completion, rating or preference records."""


@dataclass
class RMTrainSection:
    steps: int = 200
    """Deep models: optimizer steps."""
    batch_size: int = 16
    """Deep models: preference pairs per optimizer step."""
    micro_batch_size: int = 8
    """Deep models: pairs per forward/backward pass (batch_size / micro_batch_size = gradient accumulation)."""
    rating_batch_size: int = 16
    """Deep models: ratings per optimizer step when rating data is given."""
    rating_coef: float = 1.0
    """Weight of the rating regression loss (mean squared error on z-scored ratings) next to the BT loss."""
    use_margin: bool = True
    """Use a pair's 'margin' field (label strength) as the BT margin: −log σ(Δ − m)."""
    ties: Literal["half", "skip"] = "half"
    """Tie pairs: half trains them with BT target ½ (equal scores); skip drops them."""
    bf16_autocast: bool = False
    """Deep models: run forward/backward under torch.autocast(bfloat16) (weights and optimizer stay float32);
    2-4x faster on CPUs with AVX512-BF16 and on GPUs."""
    eval_batch_size: int = 32
    """Sequences per forward pass when scoring (eval, normalisation)."""
    l2: float = 1.0
    """Linear models: L2 penalty λ/2‖w‖² on standardised features (features have std 1)."""
    l2_grid: list[float] = field(default_factory=list)
    """Linear models: pick train.l2 from these values by 5-fold cross-validation (BT loss) on the training pairs."""
    max_iter: int = 1000
    """Linear models: L-BFGS iterations."""
    normalize_std: bool = False
    """Also scale scores to std 1 on the reference set (population std); False only shifts to mean 0."""
    normalize_samples: int = 2000
    """Most reference completions scored for the normalisation (a seeded random subset)."""
    cache_dir: str = ""
    """Feature cache folder; empty = $RLHFKIT_CACHE_DIR or ~/.cache/rlhfkit/features; none disables it."""
    feature_batch_size: int = 32
    """Texts per forward pass of embedding feature extractors."""


@dataclass
class RMTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rm"))
    model: RMModelConfig = field(default_factory=RMModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: RMTrainSection = field(default_factory=RMTrainSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=10))

    def validate(self) -> None:
        if not self.data.train:
            raise UserError("data.train: required (a file of preference pairs or ratings)")
        if not 0 <= self.data.eval_fraction < 1:
            raise UserError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        if self.data.max_length < 4:
            raise UserError(f"data.max_length: must be >= 4, got {self.data.max_length}")
        t = self.train
        for key in ("steps", "batch_size", "micro_batch_size", "rating_batch_size", "eval_batch_size", "max_iter",
                    "normalize_samples", "feature_batch_size"):
            if getattr(t, key) < 1:
                raise UserError(f"train.{key}: must be >= 1, got {getattr(t, key)}")
        if t.l2 < 0 or not math.isfinite(t.l2):
            raise UserError(f"train.l2: must be >= 0, got {t.l2}")
        if t.rating_coef < 0:
            raise UserError(f"train.rating_coef: must be >= 0, got {t.rating_coef}")
        exact_div(t.batch_size, t.micro_batch_size, "train.batch_size / train.micro_batch_size")


@dataclass
class RMPathSection:
    path: str = ""
    """Reward model folder: a run.output_dir of `rlhfkit rm train`, or its model/ subfolder."""


@dataclass
class RMEvalData:
    eval: str = ""
    """Preference pairs to evaluate on (any preference format, incl. Anthropic HH .jsonl.gz)."""


@dataclass
class RMEvalConfig:
    model: RMPathSection = field(default_factory=RMPathSection)
    data: RMEvalData = field(default_factory=RMEvalData)
    output: str = ""
    """JSON file for the metrics; the plots are written next to it (OUTPUT_STEM_*.png)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default (1 can be much faster on a CPU shared with other jobs)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    plots: bool = True
    """Write the reliability, score-gap and length PNGs."""
    progress: bool = True
    """Show progress bars on stderr."""

    def validate(self) -> None:
        if not self.model.path:
            raise UserError("model.path: required (a reward model folder from `rlhfkit rm train`)")
        if not self.data.eval:
            raise UserError("data.eval: required (a file of preference pairs)")
        if not self.output:
            raise UserError("output: required (a .json file for the metrics)")
        if self.batch_size < 1:
            raise UserError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class RMScoreConfig:
    model: RMPathSection = field(default_factory=RMPathSection)
    input: str = ""
    """JSONL of {"prompt", "completion"} (adds "score") or {"prompt", "completions": [...]} (adds "scores")."""
    output: str = ""
    """Output JSONL: every input record with the score field(s) added."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default (1 can be much faster on a CPU shared with other jobs)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    progress: bool = True
    """Show progress bars on stderr."""

    def validate(self) -> None:
        if not self.model.path:
            raise UserError("model.path: required (a reward model folder from `rlhfkit rm train`)")
        if not self.input:
            raise UserError("input: required (a JSONL file of prompt/completion records)")
        if not self.output:
            raise UserError("output: required (the JSONL file to write)")
        check_jsonl_output(self.output, "output")
        if self.batch_size < 1:
            raise UserError(f"batch_size: must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------------------------------------------
# Commands


def normalize(rm: Any, prompts: list, completions: list, with_std: bool, where: str) -> dict:
    """Set rm.shift (and rm.scale) so raw scores on the reference set have mean 0 (std 1, population std)."""
    if not prompts:
        rm.shift, rm.scale = 0.0, 1.0
        return {"reference": "none", "n": 0}
    raw = np.asarray(rm.raw_scores(prompts, completions), np.float64)
    mean, std = float(raw.mean()), float(raw.std())
    rm.shift = mean
    rm.scale = std if with_std and std > 1e-12 else 1.0
    info = {"reference": where, "n": int(len(raw)), "raw_mean": mean, "raw_std": std, "std_normalized": with_std}
    rm.meta["normalization"] = info
    return info


def evaluate_model(rm: Any, pairs: list, output: str | Path | None, plots: bool = True, counts: dict | None = None,
                   progress: bool = False) -> dict:
    """Pairwise metrics of `rm` on (label == chosen) pairs; writes OUTPUT.json and OUTPUT_STEM_*.png."""
    from rlhfkit.reward.features import completion_text
    from rlhfkit.reward.metrics import pairwise_metrics, write_plots

    pairs = [p for p in pairs if p.label == "chosen"]
    if not pairs:
        raise UserError("eval: no pairs with a preferred reply to evaluate (ties and both-bad pairs are skipped)")
    prompts = [p.prompt for p in pairs] * 2
    comps = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    raw = np.asarray(rm.raw_scores(prompts, comps, progress=progress), np.float64)
    c, r = raw[: len(pairs)], raw[len(pairs):]
    lengths = [len(completion_text(p, x).strip()) for p, x in zip(prompts, comps)]
    metrics = pairwise_metrics(c, r, lengths[: len(pairs)], lengths[len(pairs):])
    metrics = {"accuracy": metrics.pop("accuracy"), "pairs": metrics.pop("pairs"), **metrics,
               "kind": rm.kind, "normalization": {"shift": rm.shift, "scale": rm.scale}, **(counts or {})}
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if plots:
            metrics["plots"] = write_plots(metrics, c - r, out.with_suffix(""))
        atomic_write_text(out, json.dumps(metrics, indent=1) + "\n")
    return metrics


def train(cfg: RMTrainConfig, argv: list[str] | None = None) -> dict:
    from rlhfkit import distributed as D

    world = D.init_world(cfg.run)  # one process, or a rank of `accelerate launch` / `torchrun` (deep models)
    if world.size > 1 and cfg.model.kind == "linear":
        raise UserError("model.kind=linear: trains in one process (L-BFGS on features); run it without a launcher")
    out = world.setup_run(cfg, argv)
    t0 = time.perf_counter()
    data = load_rm_data(cfg)
    print("rm train: " + ", ".join(f"{k} {v}" for k, v in data.counts.items()), flush=True)
    if cfg.model.kind == "linear":
        rm, result = train_linear(cfg, data)
    else:
        from rlhfkit.reward.deep import train_deep

        rm, result = train_deep(cfg, data.train_pairs, data.ratings, data.eval_pairs, out, world)
        if not result["finished"]:
            print(f"rm train: stopped at step {result['step']} of {cfg.train.steps}; continue with --resume")
            return result
        if not world.is_main:  # rank 0 alone normalises, evaluates and saves the trained model
            return result
    prompts, comps, where = reference_set(cfg, data)
    result["normalization"] = normalize(rm, prompts, comps, cfg.train.normalize_std, where)
    rm.meta["data"] = {"train": cfg.data.train, **data.counts}
    rm.save(out / "model")
    result["model_dir"] = str(out / "model")
    if data.eval_pairs:
        metrics = evaluate_model(rm, data.eval_pairs, out / "eval.json", counts={"source": data.counts.get(
            "eval_source")}, progress=cfg.run.progress)
        result["eval/accuracy"], result["eval/bt_loss"] = metrics["accuracy"], metrics["bt_loss"]
        print(f"rm train: held-out accuracy {metrics['accuracy']:.4f} on {metrics['pairs']} pairs "
              f"(BT loss {metrics['bt_loss']:.4f}, ECE {metrics['ece']:.3f}) -> {out / 'eval.json'}")
    result["seconds_total"] = time.perf_counter() - t0
    atomic_write_text(out / "result.json", json.dumps(result, indent=1, default=float) + "\n")
    print(f"rm train: saved {out / 'model'}")
    return result


def train_linear(cfg: RMTrainConfig, data: RMData) -> tuple[Any, dict]:
    from rlhfkit.models import pick_device
    from rlhfkit.reward.features import FeatureCache, featurize, make_extractor
    from rlhfkit.reward.linear import LinearRewardModel, choose_l2, fit_linear

    device = str(pick_device(cfg.run.device))
    ext = make_extractor(cfg.model.features, cfg.model.context_chars, cfg.model.pooling,
                         cfg.model.feature_max_length, cfg.train.feature_batch_size, device)
    cache = None if cfg.train.cache_dir == "none" else FeatureCache(ext, cfg.train.cache_dir or None)
    pairs, ratings = data.train_pairs, data.ratings
    t0 = time.perf_counter()
    phi = featurize(ext, [p.prompt for p in pairs] * 2 + [r.prompt for r in ratings],
                    [p.chosen for p in pairs] + [p.rejected for p in pairs] + [r.completion for r in ratings],
                    cache, progress=cfg.run.progress).astype(np.float64)
    feature_seconds = time.perf_counter() - t0
    mean, std = phi.mean(0), phi.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    z = (phi - mean) / std
    n = len(pairs)
    diff = z[:n] - z[n: 2 * n]
    target = np.array([0.5 if p.label == "tie" else 1.0 for p in pairs])
    margin = np.array([float(p.margin or 0.0) if cfg.train.use_margin and p.label != "tie" else 0.0 for p in pairs])
    l2, cv = cfg.train.l2, None
    if cfg.train.l2_grid and n >= 10:
        l2, cv = choose_l2(diff, target, margin, cfg.train.l2_grid, cfg.train.max_iter, cfg.data.split_seed)
        print("rm train (linear): 5-fold CV BT loss " + ", ".join(f"l2={k:g}: {v:.4f}" for k, v in cv.items())
              + f" -> l2={l2:g}")
    w, b, stats = fit_linear(pair_diff=diff if n else None, pair_target=target, pair_margin=margin,
                             rating_x=z[2 * n:] if ratings else None,
                             rating_y=np.array([r.score for r in ratings]) if ratings else None,
                             l2=l2, rating_coef=cfg.train.rating_coef, max_iter=cfg.train.max_iter)
    if cv:
        stats["cv_bt_loss"] = {f"{k:g}": v for k, v in cv.items()}
    rm = LinearRewardModel(ext, w, b, mean, std, cache=cache,
                           meta={"training": {"pairs": n, "ratings": len(ratings), "l2": l2, **stats}})
    result = {**{f"train/{k}": v for k, v in stats.items()}, "feature_seconds": feature_seconds,
              "features": ext.spec, "dim": ext.dim}
    if cache is not None:
        result.update(cache_hits=cache.hits, cache_misses=cache.misses, cache_file=str(cache.path))
        print(f"rm train (linear): features {ext.spec} (dim {ext.dim}): {cache.hits} cached, {cache.misses} computed "
              f"in {feature_seconds:.1f}s; cache {cache.path}")
    fit = [f"{label} {stats[key]:.4f}" for key, label in (("train_bt_loss", "train BT loss"),
                                                           ("train_accuracy", "train accuracy"),
                                                           ("train_mse", "train rating MSE")) if key in stats]
    print(f"rm train (linear): {stats['solver']}, {', '.join(fit)}", flush=True)
    return rm, result




def evaluate(cfg: RMEvalConfig, argv: list[str] | None = None) -> dict:
    from rlhfkit.reward import load_reward_model

    _set_threads(cfg.threads)
    rm = load_reward_model(cfg.model.path, device=cfg.device, cache=True)
    rm.batch_size = cfg.batch_size
    data = load_preferences(cfg.data.eval)
    counts = {"read": data.read, "dropped_identical": data.dropped_identical, "dropped_empty": data.dropped_empty,
              "duplicates": data.duplicates, "ties_skipped": data.ties, "both_bad_skipped": data.both_bad,
              "source": cfg.data.eval, "model_path": cfg.model.path}
    metrics = evaluate_model(rm, data.pairs, cfg.output, cfg.plots, counts, progress=cfg.progress)
    print(f"rm eval: accuracy {metrics['accuracy']:.4f} on {metrics['pairs']} pairs, BT loss {metrics['bt_loss']:.4f}, "
          f"ECE {metrics['ece']:.3f} ({data.summary()}) -> {cfg.output}")
    return metrics


def score(cfg: RMScoreConfig, argv: list[str] | None = None) -> dict:
    from rlhfkit.data import write_jsonl
    from rlhfkit.reward import load_reward_model

    recs = read_records(cfg.input)
    parsed = scoring_records(cfg.input)
    _set_threads(cfg.threads)
    rm = load_reward_model(cfg.model.path, device=cfg.device)
    rm.batch_size = cfg.batch_size
    prompts = [p for p, cs, _ in parsed for _ in cs]
    comps = [c for _, cs, _ in parsed for c in cs]
    scores = rm.score(prompts, comps, progress=cfg.progress)
    rows, k = [], 0
    for rec, (_, cs, many) in zip(recs, parsed):
        row = dict(rec.data)
        if many:
            row["scores"] = scores[k: k + len(cs)]
        else:
            row["score"] = scores[k]
        k += len(cs)
        rows.append(row)
    n = write_jsonl(cfg.output, rows)
    print(f"rm score: {len(scores)} completions in {n} records scored (mean {np.mean(scores):.4f}) -> {cfg.output}")
    return {"records": n, "completions": len(scores), "mean_score": float(np.mean(scores))}


def _set_threads(n: int) -> None:
    if n < 0:
        raise UserError(f"threads: must be >= 0, got {n}")
    if n:
        import torch

        torch.set_num_threads(n)


def main(cfg: Any, argv: list[str] | None = None) -> dict:
    """CLI entry: dispatch on the config type (rm train / rm eval / rm score)."""
    if isinstance(cfg, RMTrainConfig):
        return train(cfg, argv)
    if isinstance(cfg, RMEvalConfig):
        return evaluate(cfg, argv)
    if isinstance(cfg, RMScoreConfig):
        return score(cfg, argv)
    raise TypeError(f"rm: unexpected config {type(cfg).__name__}")
