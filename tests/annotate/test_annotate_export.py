"""generate -> import -> label (HTTP) -> export -> load with rlhfkit.data: the exported files are exactly what the
reward-model and DPO stages read."""

from __future__ import annotations

import json

import pytest

from rlhfkit.annotate.export import build_rows
from rlhfkit.cli import run_command
from rlhfkit.data import edits_to_preferences, load_edits, load_preferences, load_ratings


def _label_all(app, annotator, pid, decide):
    """Label every task `annotator` is given with decide(task) -> label fields; returns the count."""
    n = 0
    while True:
        task = app.post(f"/api/projects/{pid}/next", headers=app.hdr(annotator)).json()["task"]
        if task is None:
            return n
        body = {"item_id": task["item_id"], "client_key": f"{annotator}-{task['item_id']}", **decide(task)}
        r = app.post("/api/labels", headers=app.hdr(annotator), json=body)
        assert r.status_code == 201, r.text
        n += 1


def test_roundtrip_generate_import_label_export_load(app, tmp_path):
    cands = tmp_path / "candidates.jsonl"
    run_command(["generate", "data.prompts=bundled:tinystories_prompts.jsonl", "data.limit=3", "num_samples=2",
                 "gen.max_new_tokens=12", "gen.temperature=1.0", f"output={cands}", "progress=false", "device=cpu",
                 "seed=1"])
    rows = [json.loads(line) for line in cands.read_text().splitlines()]
    assert all(len(r["completions"]) == 2 for r in rows)
    admin = app.hdr("admin")
    pid = app.post("/api/projects", headers=admin, json={
        "name": "loop", "kinds": ["pairwise", "rating", "edit"], "k": 3, "criteria": ["helpful", "fluent"],
        "gold_rate": 0}).json()["id"]
    r = app.post(f"/api/projects/{pid}/items", headers=admin, json={"records": rows})
    assert r.json()["added"] == 3 * (1 + 2 + 2)
    for name in ("ann1", "ann2", "ann3"):
        app.post(f"/api/projects/{pid}/members", headers=admin, json={"user": name})

    def longer(task, flip=False):  # ann1, ann2 prefer the longer completion, ann3 the shorter
        a = task["completions"][0]
        if task["kind"] == "pairwise":
            b = task["completions"][1]
            pick_a = (len(a) >= len(b)) != flip
            return {"choice": "A" if pick_a else "B", "strength": 2}
        if task["kind"] == "rating":
            return {"ratings": {"helpful": 6 if not flip else 2, "fluent": 4}}
        return {"edited": a.strip() + " The end.", "tags": ["unfinished"]}

    assert _label_all(app, "ann1", pid, longer) == 15
    assert _label_all(app, "ann2", pid, longer) == 15
    assert _label_all(app, "ann3", pid, lambda t: longer(t, flip=True)) == 15

    def export(**params):
        r = app.get(f"/api/projects/{pid}/export", headers=admin, params=params)
        assert r.status_code == 200, r.text
        path = tmp_path / f"{'-'.join(map(str, params.values()))}.jsonl"
        path.write_text(r.text, encoding="utf-8")
        return path

    prefs = load_preferences(export(kind="preferences", mode="majority"))
    assert len(prefs.pairs) == 3
    by_prompt = {r["prompt"]: r["completions"] for r in rows}
    for pair in prefs.pairs:
        a, b = by_prompt[pair.prompt]
        longest, shortest = (a, b) if len(a) >= len(b) else (b, a)
        assert (pair.chosen, pair.rejected) == (longest, shortest)  # 2 of 3 votes
        assert pair.margin == 2.0 and sorted(pair.extra["votes"].values()) == [1, 2]
        assert sorted(pair.extra["annotators"]) == ["ann1", "ann2", "ann3"]
    every = load_preferences(export(kind="preferences", mode="all"))
    assert len(every.pairs) == 9
    assert {p.extra["annotator"] for p in every.pairs} == {"ann1", "ann2", "ann3"}
    assert all(p.extra["created_at"].endswith("Z") for p in every.pairs)
    ratings = load_ratings(export(kind="ratings", mode="majority"))
    assert len(ratings) == 6
    # helpful: (6 + 6 + 2) / 3, fluent: 4 -> score = mean of criteria means = (14/3 + 4) / 2 = 4.333...
    assert all(r.score == pytest.approx((14 / 3 + 4) / 2) for r in ratings)
    assert ratings[0].extra["scores"] == {"fluent": 4.0, "helpful": round(14 / 3, 4)}
    assert len(load_ratings(export(kind="ratings", mode="all", criterion="helpful"))) == 18
    edits = load_edits(export(kind="edits"))
    assert len(edits) == 18 and all(e.edited.endswith("The end.") for e in edits)
    pairs = load_preferences(export(kind="edit_pairs")).pairs
    assert [(p.chosen, p.rejected) for p in pairs] == [(p.chosen, p.rejected) for p in edits_to_preferences(edits)]
    both = load_preferences(export(kind="preferences", mode="majority", edits="true"))
    assert len(both.pairs) == 3 + 18


def _vote(item_id, who, choice, strength=None, t=1.7e9):
    return {"item_id": item_id, "annotator": who, "kind": "pairwise", "choice": choice, "strength": strength,
            "created_at": t, "tags": [], "comment": "", "ratings": None, "edited": None}


def test_majority_vote_rules():
    items = [{"id": i, "prompt": f"p{i}", "completions": [f"a{i}", f"b{i}"]} for i in (1, 2, 3, 4)]
    labels = [_vote(1, "x", "B", 3), _vote(1, "y", "B", 1), _vote(1, "z", "A"),   # B wins 2:1, margin (3+1)/2
              _vote(2, "x", "A"), _vote(2, "y", "B"),                             # split: skipped
              _vote(3, "x", "tie"), _vote(3, "y", "tie"), _vote(3, "z", "A"),     # tie wins
              _vote(4, "x", "A")]                                                  # one vote
    rows, skipped = build_rows(items, labels, kind="preferences")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b1", "a1"), ("a4", "b4")]
    assert rows[0]["margin"] == 2.0 and rows[0]["agreement"] == 0.6667
    assert skipped == {"split_votes": 1, "majority_tie": 1}
    rows, _ = build_rows(items, labels, kind="preferences", ties=True, min_votes=2)
    assert [r.get("label", "chosen") for r in rows] == ["chosen", "tie"]
    rows, skipped = build_rows(items, labels, kind="preferences", mode="all")
    assert len(rows) == 7 and skipped == {"tie_votes_skipped": 2}
    assert rows[0]["chosen"] == "b1" and rows[0]["annotator"] == "x" and rows[0]["margin"] == 3.0
