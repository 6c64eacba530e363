"""The store on SQLite and on a real PostgreSQL server: schema versioning, import, assignment, idempotent labels."""

from __future__ import annotations

import json
import threading

import pytest
from annotate_helpers import CANDIDATES, make_project
from sqlalchemy import create_engine, text

from rlhfkit.annotate import store as store_mod
from rlhfkit.annotate import tables
from rlhfkit.annotate.api import import_candidates
from rlhfkit.annotate.errors import ApiError
from rlhfkit.annotate.schemas import LabelCreate, check_label
from rlhfkit.annotate.store import Store
from rlhfkit.errors import UserError


def label(store, user, item, key, **fields):
    project = store.get_project(project_id=item["project_id"])
    payload = check_label(project, item["kind"], LabelCreate(item_id=item["id"], client_key=key, **fields))
    return store.submit_label(user=user, item=item, payload=payload)


def test_sqlite_runs_in_wal_mode(tmp_path):
    s = Store(str(tmp_path / "x.db"))
    with s.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL (FULL = 2 with sqlite_synchronous=FULL)
    s.close()


def test_schema_version_is_checked(db_url, monkeypatch):
    s = Store(db_url)
    assert s.schema_version() == tables.SCHEMA_VERSION
    with s.engine.begin() as c:
        c.execute(tables.meta.update().values(value="0"))
    s.close()
    with pytest.raises(UserError, match="schema version 0, older .*`rlhfkit annotate migrate"):
        Store(db_url)
    # a registered migration brings it up to date with migrate=True
    ran = []
    monkeypatch.setitem(store_mod.MIGRATIONS, 0, lambda conn: ran.append(conn.execute(text("SELECT 1")).scalar()))
    s = Store(db_url, migrate=True)
    assert ran == [1] and s.schema_version() == tables.SCHEMA_VERSION
    with s.engine.begin() as c:
        c.execute(tables.meta.update().values(value=str(tables.SCHEMA_VERSION + 1)))
    s.close()
    with pytest.raises(UserError, match="newer than this rlhfkit"):
        Store(db_url)


def test_refuses_foreign_database(tmp_path):
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE labels (id INTEGER PRIMARY KEY, x TEXT)"))
    engine.dispose()
    with pytest.raises(UserError, match="no rlhfkit_meta"):
        Store(str(path))
    with pytest.raises(UserError, match="missing.db not found"):
        Store(str(tmp_path / "missing.db"), create=False)
    assert not (tmp_path / "missing.db").exists()  # opening never leaves an empty file behind


def test_import_is_idempotent_and_transactional(store, tmp_path):
    make_project(store, "p", kinds=["pairwise", "rating"], k=2)
    src = tmp_path / "cands.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in CANDIDATES), encoding="utf-8")
    first = import_candidates(store, "p", str(src))
    # 3 records x (1 pair + 2 rating items)
    assert first == {"records": 3, "items": 9, "added": 9, "already_present": 0}
    assert import_candidates(store, "p", str(src))["added"] == 0
    pid = store.get_project(name="p").id
    assert len(store.items(project_id=pid)) == 9
    # a bad line 3 (after two good new ones) rejects the whole file, naming file:line and field
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "new", "completions": ["a", "b"]}) + "\n"
                   + json.dumps({"prompt": "new2", "completions": ["c", "d"]}) + "\n"
                   + json.dumps({"prompt": "new3", "completions": ["e", 7]}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: field 'completions\[1\]': expected a string"):
        import_candidates(store, "p", str(bad))
    assert len(store.items(project_id=pid)) == 9


def test_pair_order_is_shuffled_but_stable(store):
    make_project(store, "p", kinds=["pairwise"])
    records = [{"prompt": f"p{i}", "completions": [f"first {i}", f"second {i}"], "gold": "A"} for i in range(40)]
    import_candidates(store, "p", records)
    items = store.items(project_id=store.get_project(name="p").id)
    swapped = [it for it in items if it["completions"][0].startswith("second")]
    assert 5 < len(swapped) < 35  # position varies
    for it in items:  # the gold answer follows its completion
        first_is_a = it["completions"][0].startswith("first")
        assert it["gold"] == {"choice": "A" if first_is_a else "B"}
        assert it["extra"]["indices"] == ([0, 1] if first_is_a else [1, 0])


def test_csv_candidates_read_gold_score_as_a_number(store, tmp_path):
    """A CSV cell is a string: gold_score reads as a number, a blank gold or gold_score cell is no gold."""
    make_project(store, "csv", kinds=["pairwise", "rating"], scale_min=1, scale_max=5)
    path = tmp_path / "cands.csv"
    path.write_text("prompt,chosen,rejected,gold,gold_score\nQ1,yes,no,A, 4\nQ2,fine,bad,,\n")
    import_candidates(store, "csv", path)
    items = store.items(project_id=store.get_project(name="csv").id)
    golds = {(it["prompt"], it["kind"], it["completions"][0]): it["gold"] for it in items}
    assert golds[("Q1", "rating", "yes")] == {"score": 4.0}
    assert all(g is None for (p, _, _), g in golds.items() if p == "Q2")
    path.write_text("prompt,chosen,rejected,gold_score\nQ3,yes,no,six\n")
    with pytest.raises(UserError, match="cands.csv:2: field 'gold_score': expected a number, got 'six'"):
        import_candidates(store, "csv", path)


def test_assignment_k_distinct_no_repeats_and_leases(store):
    project = make_project(store, "p", kinds=["pairwise"], k=2, lease_seconds=60, gold_rate=0.0)
    import_candidates(store, "p", CANDIDATES[:2])  # 2 pairwise items
    users = [store.create_user(name=f"u{i}", role="annotator")[0] for i in range(3)]
    for u in users:
        store.add_member(project_id=project.id, user_id=u.id)
    u0, u1, u2 = users
    t0 = store.next_task(user=u0, project_id=project.id, now=1000.0)
    assert store.next_task(user=u0, project_id=project.id, now=1001.0)["id"] == t0["id"]  # same lease back
    label(store, u0, t0, "k0", choice="A")
    t0b = store.next_task(user=u0, project_id=project.id, now=1002.0)
    assert t0b["id"] != t0["id"]  # never the same item twice
    label(store, u0, t0b, "k0b", choice="B")
    assert store.next_task(user=u0, project_id=project.id, now=1003.0) is None  # u0 has labelled everything
    t1 = store.next_task(user=u1, project_id=project.id, now=1004.0)
    t2 = store.next_task(user=u2, project_id=project.id, now=1005.0)
    assert {t1["id"], t2["id"]} == {t0["id"], t0b["id"]}  # k=2: each item has one slot left
    # u2 abandons: after the lease expires, the item goes back to the queue (u1 gets it once done with t1)
    label(store, u1, t1, "k1", choice="A")
    assert store.next_task(user=u1, project_id=project.id, now=1010.0) is None  # u2's lease still live
    again = store.next_task(user=u1, project_id=project.id, now=1005.0 + 61)
    assert again["id"] == t2["id"]
    label(store, u1, again, "k1b", choice="B")
    # u2's late label is still accepted (work is never thrown away), and counted once
    late, created = label(store, u2, t2, "k2", choice="A")
    assert created
    prog = store.progress(project_id=project.id)
    assert prog["complete_items"] == 2 and prog["labels"] == 5


def test_gold_items_served_and_scored(store):
    project = make_project(store, "g", kinds=["pairwise"], k=1, gold_rate=0.5)
    import_candidates(store, "g", [{"prompt": "gold", "completions": ["good answer", "bad"], "gold": "A"},
                                   *CANDIDATES])
    u = store.create_user(name="a", role="annotator")[0]
    store.add_member(project_id=project.id, user_id=u.id)
    first = store.next_task(user=u, project_id=project.id)
    assert first["gold"] is not None  # gold share 0 < 0.5: a gold item first
    right = first["gold"]["choice"]
    label(store, u, first, "g1", choice=right)
    stats = store.annotator_stats(project_id=project.id)
    assert stats[0]["gold_seen"] == 1 and stats[0]["gold_accuracy"] == 1.0


def test_submit_is_idempotent_and_validated(store):
    project = make_project(store, "p", kinds=["pairwise", "rating"], k=3, criteria=["helpful", "fluent"],
                           scale_min=1, scale_max=5, gold_rate=0.0)
    import_candidates(store, "p", CANDIDATES[:1])
    u = store.create_user(name="a", role="annotator")[0]
    store.add_member(project_id=project.id, user_id=u.id)
    item = store.next_task(user=u, project_id=project.id)
    assert item["kind"] == "pairwise"
    lab, created = label(store, u, item, "key-1", choice="B", strength=2, tags=["too long"], comment="ok")
    again, created2 = label(store, u, item, "key-1", choice="B", strength=2, tags=["too long"], comment="ok")
    assert created and not created2 and again["id"] == lab["id"]
    with pytest.raises(ApiError, match="already used for a different label") as err:
        label(store, u, item, "key-1", choice="A")
    assert err.value.status == 409
    with pytest.raises(ApiError, match="already labelled"):
        label(store, u, item, "key-2", choice="A")
    rating = store.next_task(user=u, project_id=project.id)
    assert rating["kind"] == "rating"
    with pytest.raises(ApiError, match="outside the scale 1..5"):
        label(store, u, rating, "r1", ratings={"helpful": 6, "fluent": 3})
    with pytest.raises(ApiError, match="missing \\['fluent'\\]"):
        label(store, u, rating, "r1", ratings={"helpful": 3})
    with pytest.raises(ApiError, match="required for a rating item"):
        label(store, u, rating, "r1", choice="A")
    assert store.count_labels(project_id=project.id) == 1  # nothing partial was written
    label(store, u, rating, "r1", ratings={"helpful": 4, "fluent": 5})
    assert store.count_labels(project_id=project.id) == 2


def test_concurrent_assignment_respects_k(store):
    """20 threads ask for work at once on 5 items with k=2: no item is leased to more than 2 annotators."""
    project = make_project(store, "c", kinds=["pairwise"], k=2, gold_rate=0.0)
    import_candidates(store, "c", [{"prompt": f"p{i}", "completions": ["a", "b"]} for i in range(5)])
    users = [store.create_user(name=f"t{i}", role="annotator")[0] for i in range(20)]
    got: dict[str, int | None] = {}
    barrier = threading.Barrier(len(users))

    def work(u):
        barrier.wait()
        t = store.next_task(user=u, project_id=project.id)
        got[u.name] = t and t["id"]

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    [t.start() for t in threads]
    [t.join() for t in threads]
    leased = [v for v in got.values() if v is not None]
    assert len(leased) == 10  # 5 items x k=2
    assert all(leased.count(i) == 2 for i in set(leased))
