"""Inter-annotator agreement: percent agreement and Krippendorff's alpha (pure Python, no database).

A "unit" is one item and holds the values its annotators gave (a pairwise choice, or a rating). Units with fewer
than two values carry no agreement information and are skipped.

percent agreement = mean over units of  sum_c n_c (n_c - 1) / (m (m - 1))
    (the share of ordered annotator pairs on the unit that agree; Fleiss' P-bar, which allows any m >= 2)

Krippendorff's alpha = 1 - D_o / D_e  (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"):
    coincidences  o_ck = sum_u  (number of ordered pairs (c, k) in unit u) / (m_u - 1)
    n_c = sum_k o_ck,  n = sum_c n_c
    alpha = 1 - (n - 1) * sum_ck o_ck d(c, k) / sum_ck n_c n_k d(c, k)
with d(c, k) = [c != k] (nominal: choices) or (c - k)^2 (interval: ratings). alpha is 1 for perfect agreement,
about 0 for chance, negative for systematic disagreement; undefined (None) when all values are the same.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Hashable, Iterable


def _units(units: Iterable[list]) -> list[list]:
    return [list(u) for u in units if len(u) >= 2]


def percent_agreement(units: Iterable[list]) -> float | None:
    us = _units(units)
    if not us:
        return None
    total = 0.0
    for u in us:
        m = len(u)
        total += sum(n * (n - 1) for n in Counter(u).values()) / (m * (m - 1))
    return total / len(us)


def _distance(metric: str):
    if metric == "nominal":
        return lambda a, b: 0.0 if a == b else 1.0
    if metric == "interval":
        return lambda a, b: (float(a) - float(b)) ** 2
    raise ValueError(f"unknown metric {metric!r} (nominal or interval)")


def krippendorff_alpha(units: Iterable[list], metric: str = "nominal") -> float | None:
    us = _units(units)
    delta = _distance(metric)
    coincidence: dict[tuple, float] = defaultdict(float)
    for u in us:
        m = len(u)
        for i, j in itertools.permutations(range(m), 2):
            coincidence[(u[i], u[j])] += 1.0 / (m - 1)
    n_c: dict[Hashable, float] = defaultdict(float)
    for (c, _k), v in coincidence.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return None
    observed = sum(v * delta(c, k) for (c, k), v in coincidence.items())
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in n_c for k in n_c)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def agreement_report(values: dict[tuple[int, str], object], metric: str = "nominal") -> dict:
    """values: {(item_id, annotator): value}. Returns the project figures and one row per annotator pair
    (items both labelled, their percent agreement and alpha on those items)."""
    by_item: dict[int, dict[str, object]] = defaultdict(dict)
    for (item, who), v in values.items():
        by_item[item][who] = v
    units = [list(d.values()) for d in by_item.values()]
    report = {"metric": metric, "items_with_2plus": len(_units(units)),
              "percent_agreement": _round(percent_agreement(units)),
              "krippendorff_alpha": _round(krippendorff_alpha(units, metric)), "pairs": []}
    annotators = sorted({who for (_i, who) in values})
    for a, b in itertools.combinations(annotators, 2):
        shared = [[d[a], d[b]] for d in by_item.values() if a in d and b in d]
        if not shared:
            continue
        report["pairs"].append({"a": a, "b": b, "items": len(shared),
                                "percent_agreement": _round(percent_agreement(shared)),
                                "krippendorff_alpha": _round(krippendorff_alpha(shared, metric))})
    return report


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def project_agreement(labels: list[dict]) -> dict:
    """Agreement of a project's labels (store.labels rows): pairwise choices as nominal values, ratings as
    interval values (the mean over criteria, and each criterion on its own)."""
    out = {}
    pair = {(r["item_id"], r["annotator"]): r["choice"] for r in labels if r["kind"] == "pairwise"}
    if pair:
        out["pairwise"] = agreement_report(pair, "nominal")
    ratings = [r for r in labels if r["kind"] == "rating" and r["ratings"]]
    if ratings:
        mean = {(r["item_id"], r["annotator"]): sum(r["ratings"].values()) / len(r["ratings"]) for r in ratings}
        out["rating"] = agreement_report(mean, "interval")
        criteria = sorted({c for r in ratings for c in r["ratings"]})
        if len(criteria) > 1:
            out["rating"]["criteria"] = {
                c: {k: v for k, v in agreement_report(
                    {(r["item_id"], r["annotator"]): r["ratings"][c] for r in ratings if c in r["ratings"]},
                    "interval").items() if k != "pairs"} for c in criteria}
    return out
