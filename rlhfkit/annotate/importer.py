"""Turning candidate records into annotation items.

Accepted records (prompt: a string or a list of chat messages):
    {"prompt", "completions": [c1, c2, ...]}   rlhfkit generate output
    {"prompt", "completion"}                   one completion (rating / edit items)
    {"prompt", "chosen", "rejected"}           an existing pair to relabel
optional: "gold": "A"|"B"|"tie"|"both_bad" (pairwise gold answer; A/B are the first/second completion of the
record) and "gold_score": number (rating gold answer). Other fields are kept with the item and exported again.

Per project kind: pairwise makes one item per pair of different completions (pairs=all|adjacent|first); rating
and edit make one item per completion. With shuffle_pairs the A/B order of a pair is decided by a hash of its
text, so the record's first completion is not always shown on the left (position bias) and re-importing gives the
same items. Every record is checked before anything is written: the first bad one raises a UserError naming
file:line and field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Any

from rlhfkit.annotate.schemas import CHOICES, MAX_TEXT, Project
from rlhfkit.data.formats import _text_or_messages
from rlhfkit.data.io import Record, field_value, number, read_records
from rlhfkit.errors import UserError

KNOWN = ("prompt", "completions", "completion", "chosen", "rejected", "gold", "gold_score")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _completions(rec: Record) -> list:
    d = rec.data
    if "completions" in d:
        value = d["completions"]
        if not isinstance(value, list) or not value:
            raise UserError(f"{rec.where}: field 'completions': expected a non-empty list of texts")
        out = []
        for i, c in enumerate(value):
            out.append(_text_or_messages(Record(rec.where, {f"completions[{i}]": c}), f"completions[{i}]"))
        return out
    if "chosen" in d or "rejected" in d:
        return [_text_or_messages(rec, "chosen"), _text_or_messages(rec, "rejected")]
    if "completion" in d:
        return [_text_or_messages(rec, "completion")]
    raise UserError(f"{rec.where}: missing field 'completions' (or 'completion', or 'chosen' and 'rejected')")


def _pairs(n: int, how: str) -> list[tuple[int, int]]:
    if how == "first":
        return [(0, 1)] if n >= 2 else []
    if how == "adjacent":
        return [(i, i + 1) for i in range(n - 1)]
    return list(itertools.combinations(range(n), 2))


def items_from_record(rec: Record, project: Project, *, shuffle_pairs: bool = True, pairs: str = "all") -> list[dict]:
    d = rec.data
    prompt = _text_or_messages(rec, "prompt")
    completions = _completions(rec)
    for i, t in enumerate([prompt, *completions]):
        if _size(t) > MAX_TEXT:
            field = "prompt" if i == 0 else "completions"
            raise UserError(f"{rec.where}: field '{field}': longer than {MAX_TEXT} characters")
    gold = field_value(rec, "gold")
    if gold is not None and gold not in CHOICES:
        raise UserError(f"{rec.where}: field 'gold': expected one of {', '.join(CHOICES)}, got {gold!r}")
    if gold is not None and len(completions) != 2:
        raise UserError(f"{rec.where}: field 'gold': a pairwise gold answer needs exactly 2 completions")
    gold_score = number(rec, "gold_score")
    if gold_score is not None:
        if isinstance(gold_score, bool) or not isinstance(gold_score, (int, float)) or not math.isfinite(gold_score):
            raise UserError(f"{rec.where}: field 'gold_score': expected a number, got {gold_score!r}")
        if not project.scale_min <= gold_score <= project.scale_max:
            raise UserError(f"{rec.where}: field 'gold_score': {gold_score} is outside the project's scale "
                            f"{project.scale_min}..{project.scale_max}")
    extra = {k: v for k, v in d.items() if k not in KNOWN}
    out = []
    if "pairwise" in project.kinds:
        made = 0
        for i, j in _pairs(len(completions), pairs):
            a, b = completions[i], completions[j]
            if a == b:
                continue
            g = gold
            if shuffle_pairs:
                blob = json.dumps([prompt, sorted([json.dumps(a), json.dumps(b)])], ensure_ascii=False)
                if hashlib.sha256(blob.encode("utf-8")).digest()[0] & 1:
                    a, b, i, j = b, a, j, i
                    g = {"A": "B", "B": "A"}.get(gold, gold)
            out.append({"kind": "pairwise", "prompt": prompt, "completions": [a, b], "source": rec.where,
                        "gold": {"choice": g} if g else None, "extra": {**extra, "indices": [i, j]}})
            made += 1
        if not made and project.kinds == ["pairwise"]:
            raise UserError(f"{rec.where}: a pairwise project needs at least 2 different completions per record, "
                            f"got {len(completions)}")
    for kind in ("rating", "edit"):
        if kind in project.kinds:
            for i, c in enumerate(completions):
                g = {"score": gold_score} if (kind == "rating" and gold_score is not None) else None
                out.append({"kind": kind, "prompt": prompt, "completions": [c], "source": rec.where, "gold": g,
                            "extra": {**extra, "indices": [i]}})
    return out


def items_from_source(source: Any, project: Project, *, name: str | None = None, shuffle_pairs: bool = True,
                      pairs: str = "all") -> tuple[list[dict], int]:
    """Items for every record of a file (or list of dicts); returns (items, number of records)."""
    records = read_records(source, name)
    items = []
    for rec in records:
        items.extend(items_from_record(rec, project, shuffle_pairs=shuffle_pairs, pairs=pairs))
    return items, len(records)
