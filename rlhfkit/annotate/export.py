"""Export labels in the formats rlhfkit's trainers read (rlhfkit.data.load_preferences / load_ratings / load_edits).

    kind=preferences mode=majority   one {"prompt", "chosen", "rejected"} per pairwise item, by majority vote
                                     (+ "margin" = mean strength of the winning votes, "votes", "annotators",
                                     "agreement" = winning share, "item_id"); split votes are skipped; ties and
                                     both-bad winners are written with "label" only when ties=true
    kind=preferences mode=all        one row per vote, with "annotator" and "created_at" (ISO 8601, UTC)
    kind=ratings     mode=majority   {"prompt", "completion", "score"}: the mean over annotators (and over criteria,
                                     unless criterion= names one), + "scores" per criterion and "n_votes"
    kind=ratings     mode=all        one row per vote, + "ratings", "annotator", "created_at"
    kind=edits                       {"prompt", "completion", "edited"} per edit that changed the text
    kind=edit_pairs                  the same edits as preference pairs: chosen = edited, rejected = original

With edits=true a preferences export appends the edit pairs. Fields beyond the format's own are extra columns
the loaders keep in `extra`. Items need min_votes labels to be exported.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict

from rlhfkit.data.io import write_jsonl
from rlhfkit.errors import UserError

EXPORT_KINDS = ("preferences", "ratings", "edits", "edit_pairs")


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _group(labels: list[dict], kind: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for lab in labels:
        if lab["kind"] == kind:
            out[lab["item_id"]].append(lab)
    return out


def _vote_extra(lab: dict) -> dict:
    extra = {"annotator": lab["annotator"], "created_at": iso(lab["created_at"]), "item_id": lab["item_id"]}
    if lab["tags"]:
        extra["tags"] = lab["tags"]
    if lab["comment"]:
        extra["comment"] = lab["comment"]
    return extra


def preference_rows(items: list[dict], labels: list[dict], *, mode: str = "majority", ties: bool = False,
                    min_votes: int = 1) -> tuple[list[dict], dict]:
    by_id = {it["id"]: it for it in items}
    stats = Counter()
    rows = []
    for item_id, votes in sorted(_group(labels, "pairwise").items()):
        if len(votes) < min_votes:
            stats["too_few_votes"] += 1
            continue
        it = by_id[item_id]
        a, b = it["completions"]
        if mode == "all":
            for v in votes:
                if v["choice"] in ("tie", "both_bad") and not ties:
                    stats["tie_votes_skipped"] += 1
                    continue
                chosen, rejected = (b, a) if v["choice"] == "B" else (a, b)
                row = {"prompt": it["prompt"], "chosen": chosen, "rejected": rejected}
                if v["choice"] in ("tie", "both_bad"):
                    row["label"] = v["choice"]
                if v["strength"] is not None:
                    row["margin"] = float(v["strength"])
                rows.append({**row, **_vote_extra(v)})
            continue
        counts = Counter(v["choice"] for v in votes)
        (top, n_top), *rest = counts.most_common() + [(None, 0)]
        if rest and rest[0][1] == n_top:
            stats["split_votes"] += 1
            continue
        if top in ("tie", "both_bad") and not ties:
            stats[f"majority_{top}"] += 1
            continue
        chosen, rejected = (b, a) if top == "B" else (a, b)
        row = {"prompt": it["prompt"], "chosen": chosen, "rejected": rejected}
        if top in ("tie", "both_bad"):
            row["label"] = top
        strengths = [v["strength"] for v in votes if v["choice"] == top and v["strength"] is not None]
        if strengths:
            row["margin"] = sum(strengths) / len(strengths)
        row.update(votes=dict(counts), annotators=sorted(v["annotator"] for v in votes),
                   agreement=round(n_top / len(votes), 4), item_id=item_id)
        rows.append(row)
    return rows, dict(stats)


def rating_rows(items: list[dict], labels: list[dict], *, mode: str = "majority", criterion: str = "",
                min_votes: int = 1) -> tuple[list[dict], dict]:
    by_id = {it["id"]: it for it in items}
    stats = Counter()
    rows = []

    def score(r: dict) -> float:
        if criterion:
            if criterion not in r:
                raise UserError(f"criterion: {criterion!r} is not one of the rated criteria {sorted(r)}")
            return float(r[criterion])
        return sum(r.values()) / len(r)

    for item_id, votes in sorted(_group(labels, "rating").items()):
        if len(votes) < min_votes:
            stats["too_few_votes"] += 1
            continue
        it = by_id[item_id]
        base = {"prompt": it["prompt"], "completion": it["completions"][0]}
        if mode == "all":
            rows.extend({**base, "score": score(v["ratings"]), "ratings": v["ratings"], **_vote_extra(v)}
                        for v in votes)
            continue
        crits = sorted({c for v in votes for c in v["ratings"]})
        per = {c: round(sum(v["ratings"][c] for v in votes) / len(votes), 4) for c in crits}
        rows.append({**base, "score": sum(score(v["ratings"]) for v in votes) / len(votes), "scores": per,
                     "n_votes": len(votes), "annotators": sorted(v["annotator"] for v in votes),
                     "item_id": item_id})
    return rows, dict(stats)


def edit_rows(items: list[dict], labels: list[dict], *, as_pairs: bool = False) -> tuple[list[dict], dict]:
    by_id = {it["id"]: it for it in items}
    stats = Counter()
    rows = []
    for item_id, votes in sorted(_group(labels, "edit").items()):
        it = by_id[item_id]
        original = it["completions"][0]
        for v in votes:
            if v["edited"] == original:
                stats["unchanged"] += 1
                continue
            if as_pairs:
                rows.append({"prompt": it["prompt"], "chosen": v["edited"], "rejected": original, **_vote_extra(v)})
            else:
                rows.append({"prompt": it["prompt"], "completion": original, "edited": v["edited"], **_vote_extra(v)})
    return rows, dict(stats)


def build_rows(items: list[dict], labels: list[dict], *, kind: str, mode: str = "majority", ties: bool = False,
               min_votes: int = 1, criterion: str = "", edits: bool = False) -> tuple[list[dict], dict]:
    if kind not in EXPORT_KINDS:
        raise UserError(f"kind: expected one of {', '.join(EXPORT_KINDS)}, got {kind!r}")
    if mode not in ("majority", "all"):
        raise UserError(f"mode: expected majority or all, got {mode!r}")
    if kind == "preferences":
        rows, stats = preference_rows(items, labels, mode=mode, ties=ties, min_votes=min_votes)
        if edits:
            more, more_stats = edit_rows(items, labels, as_pairs=True)
            rows += more
            stats.update({f"edits_{k}": v for k, v in more_stats.items()}, edit_pairs=len(more))
        return rows, stats
    if kind == "ratings":
        return rating_rows(items, labels, mode=mode, criterion=criterion, min_votes=min_votes)
    return edit_rows(items, labels, as_pairs=kind == "edit_pairs")


def export_project(store, *, project: str, kind: str, output: str, **options) -> dict:
    """Write one export file for a project; returns {"rows", "output", "skipped": {...}}."""
    proj = store.get_project(name=project)
    rows, stats = build_rows(store.items(project_id=proj.id), store.labels(project_id=proj.id), kind=kind, **options)
    if not rows:
        raise UserError(f"project {project!r}: nothing to export as {kind} ({stats or 'no labels of that kind'})")
    n = write_jsonl(output, rows)
    return {"rows": n, "output": str(output), "skipped": stats}
