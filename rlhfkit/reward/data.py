"""Reward-model data: preference/rating/edit files, the held-out split, the normalisation reference set and the
records `rlhfkit rm score` reads. See rlhfkit/trainers/rm.py for the policy on ties, both-bad pairs and duplicates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhfkit.data import (PreferenceData, detect_kind, edits_to_preferences, load_edits, load_preferences,
                          load_ratings, read_records)
from rlhfkit.errors import UserError


@dataclass
class RMData:
    train_pairs: list
    eval_pairs: list
    ratings: list
    counts: dict


def load_training_file(path: str, what: str = "data.train") -> tuple[PreferenceData | None, list]:
    """(preference data, ratings) from a preference, rating or edit file."""
    kind = detect_kind(path)
    if kind == "preference":
        return load_preferences(path), []
    if kind == "rating":
        return None, load_ratings(path)
    if kind == "edit":
        pairs = edits_to_preferences(load_edits(path))
        if not pairs:
            raise UserError(f"{what}: {path}: every edit equals its completion (no preference to learn)")
        return PreferenceData(pairs=pairs, read=len(pairs)), []
    raise UserError(f"{what}: {path}: expected preference pairs (chosen/rejected), ratings "
                    f"(prompt/completion/score) or edits (prompt/completion/edited); found {kind} records")


def _pair_key(p) -> str:
    return repr((p.prompt, p.chosen, p.rejected))


def split_pairs(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the distinct pairs (a seeded permutation); duplicates stay on one side."""
    keys = list(dict.fromkeys(_pair_key(p) for p in pairs))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    held = {keys[i] for i in order[: int(round(len(keys) * fraction))]}
    return [p for p in pairs if _pair_key(p) not in held], [p for p in pairs if _pair_key(p) in held]


def load_rm_data(cfg: Any) -> RMData:
    prefs, ratings = load_training_file(cfg.data.train)
    if cfg.data.ratings:
        extra_prefs, extra_ratings = load_training_file(cfg.data.ratings, "data.ratings")
        if extra_prefs is not None:
            raise UserError(f"data.ratings: {cfg.data.ratings}: expected rating records (prompt/completion/score)")
        ratings = ratings + extra_ratings
    counts: dict[str, Any] = {"ratings": len(ratings)}
    pairs: list = []
    if prefs is not None:
        counts.update(read=prefs.read, dropped_identical=prefs.dropped_identical, dropped_empty=prefs.dropped_empty,
                      duplicates=prefs.duplicates, ties=prefs.ties, both_bad=prefs.both_bad)
        pairs = [p for p in prefs.pairs if p.label != "both_bad"]
        if cfg.train.ties == "skip":
            pairs = [p for p in pairs if p.label != "tie"]
    eval_pairs: list = []
    if cfg.data.eval:
        eval_data = load_preferences(cfg.data.eval)
        eval_pairs = [p for p in eval_data.pairs if p.label == "chosen"]
        counts["eval_source"] = cfg.data.eval
    elif cfg.data.eval_fraction > 0 and pairs:
        pairs, held = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.split_seed)
        eval_pairs = [p for p in held if p.label == "chosen"]
        counts["eval_source"] = f"{cfg.data.eval_fraction:g} of data.train (split_seed {cfg.data.split_seed})"
    if not pairs and not ratings:
        raise UserError(f"data.train: {cfg.data.train} leaves no training pairs or ratings "
                        "(after dropping both-bad pairs and the eval split)")
    counts.update(train_pairs=len(pairs), train_ties=sum(p.label == "tie" for p in pairs), eval_pairs=len(eval_pairs))
    return RMData(pairs, eval_pairs, ratings, counts)


def reference_set(cfg: Any, data: RMData) -> tuple[list, list, str]:
    """(prompts, completions, description) of the normalisation reference set (a seeded subset)."""
    spec = cfg.data.normalize_on
    if spec == "none":
        return [], [], "none"
    if spec == "train":
        prompts = [p.prompt for p in data.train_pairs for _ in (0, 1)] + [r.prompt for r in data.ratings]
        comps = [c for p in data.train_pairs for c in (p.chosen, p.rejected)] + [r.completion for r in data.ratings]
        where = "training completions"
    else:
        prompts, comps = load_completions(spec, "data.normalize_on")
        where = spec
    seen, uniq = set(), []
    for p, c in zip(prompts, comps):
        key = repr((p, c))
        if key not in seen:
            seen.add(key)
            uniq.append((p, c))
    if len(uniq) > cfg.train.normalize_samples:
        idx = np.random.default_rng(cfg.data.split_seed + 1).choice(len(uniq), cfg.train.normalize_samples,
                                                                    replace=False)
        uniq = [uniq[i] for i in sorted(idx)]
    return [u[0] for u in uniq], [u[1] for u in uniq], where


def load_completions(path: str, what: str) -> tuple[list, list]:
    """Prompts and completions from a prompt/completion(s), rating or preference file."""
    kind = detect_kind(path)
    if kind == "preference":
        pairs = load_preferences(path).pairs
        return [p.prompt for p in pairs for _ in (0, 1)], [c for p in pairs for c in (p.chosen, p.rejected)]
    recs = scoring_records(path)
    return [p for p, cs, _ in recs for _ in cs], [c for _, cs, _ in recs for c in cs]


def _check_text(rec, key: str, value: Any) -> Any:
    from rlhfkit.data.formats import _messages

    if isinstance(value, list):
        return _messages(rec, key, value)
    if not isinstance(value, str):
        raise UserError(f"{rec.where}: field '{key}': expected a string or a list of messages, got "
                        f"{type(value).__name__}")
    return value


def scoring_records(path: str) -> list[tuple[Any, list, bool]]:
    """[(prompt, completions, many)] from {"prompt","completion"} or {"prompt","completions": [...]} records."""
    out = []
    for rec in read_records(path):
        d = rec.data
        if "prompt" not in d:
            raise UserError(f"{rec.where}: missing field 'prompt'")
        prompt = _check_text(rec, "prompt", d["prompt"])
        if "completions" in d:
            if not isinstance(d["completions"], list) or not d["completions"]:
                raise UserError(f"{rec.where}: field 'completions': expected a non-empty list")
            comps = [_check_text(rec, f"completions[{i}]", c) for i, c in enumerate(d["completions"])]
            out.append((prompt, comps, True))
        elif "completion" in d:
            out.append((prompt, [_check_text(rec, "completion", d["completion"])], False))
        else:
            raise UserError(f"{rec.where}: missing field 'completion' (or 'completions', a list)")
    return out
