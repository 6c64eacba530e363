"""Reliability against a live `rlhfkit annotate serve` process: 50 concurrent simulated annotators x 20 labels,
kill -9 of the server in the middle, restart; every acknowledged label is stored exactly once.

The sustained rate is printed (run with -s) and recorded as a test property:
    python -m pytest tests/annotate/test_annotate_load.py -s
The bigger run is `-m slow` (200 annotators x 25 labels, no kill).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from annotate_helpers import ServerProcess, free_port

from rlhfkit.annotate.api import ensure_project, import_candidates
from rlhfkit.annotate.simulate import CrowdSpec, SimReport, simulate
from rlhfkit.annotate.store import Store


def score_by_length(prompts, completions):
    return [len(c) / 10 for c in completions]


def _prepare(db: str, n_items: int, k: int) -> str:
    store = Store(db)
    ensure_project(store, "load", kinds=["pairwise"], k=k, gold_rate=0.0)
    import_candidates(store, "load", [{"prompt": f"prompt {i}", "completions": [f"short {i}", f"a longer one {i}"]}
                                      for i in range(n_items)])
    token = store.create_user(name="admin", role="admin")[1]
    store.close()
    return token


def _check_stored_once(db: str, acked: list, crowd: int, per_annotator: int) -> int:
    store = Store(db)
    labels = store.labels(project_id=store.get_project(name="load").id)
    store.close()
    by_key = Counter((lab["annotator"], lab["client_key"]) for lab in labels)
    assert all(n == 1 for n in by_key.values())
    ids = {lab["id"]: (lab["annotator"], lab["client_key"]) for lab in labels}
    for name, key, label_id in acked:  # every acknowledged label is there, under the id the server gave
        assert ids.get(label_id) == (name, key), (name, key, label_id)
    assert len(labels) == len({a[1] for a in acked}) == crowd * per_annotator  # nothing unacknowledged, no doubles
    assert len({(lab["item_id"], lab["annotator"]) for lab in labels}) == len(labels)  # no item twice per annotator
    assert Counter(lab["annotator"] for lab in labels) == {f"sim{i}": per_annotator for i in range(crowd)}
    return len(labels)


def test_50x20_concurrent_annotators_with_kill9_midway(tmp_path, record_property):
    crowd, per = 50, 20
    db = str(tmp_path / "load.db")
    token = _prepare(db, n_items=300, k=5)  # 1500 slots for 1000 labels
    port = free_port()
    log = open(tmp_path / "server.log", "ab")
    server = ServerProcess(db, port, log).start()
    report = SimReport()
    spec = CrowdSpec(crowd=crowd, max_labels=per, temperature=1.0, retry_seconds=60)
    errors: list[BaseException] = []

    def run():
        try:
            simulate(server.url, token, "load", score_by_length, spec=spec, report=report)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            errors.append(err)

    worker = threading.Thread(target=run)
    start = time.perf_counter()
    worker.start()
    try:
        while len(report.acknowledged) < 400 and worker.is_alive():
            time.sleep(0.01)
        before_kill = time.perf_counter() - start
        server.kill9()  # SIGKILL mid-load: in-flight requests die with the process
        acked_before_kill = list(report.acknowledged)
        rate = len(acked_before_kill) / before_kill
        server.start()  # same db, same port; the crowd retries with the same client keys
        worker.join(timeout=120)
    finally:
        server.stop()
        log.close()
    assert not errors, errors
    assert not worker.is_alive()
    elapsed = time.perf_counter() - start
    assert 0 < len(acked_before_kill) < crowd * per  # the kill really happened mid-load
    assert report.retries > 0  # requests did hit the dead server
    n = _check_stored_once(db, report.acknowledged, crowd, per)
    assert {a[2] for a in acked_before_kill} <= {a[2] for a in report.acknowledged}
    print(f"\nload: {crowd} annotators x {per} labels: {rate:.0f} labels/s before the kill "
          f"({len(acked_before_kill)} labels in {before_kill:.1f}s); {n} labels in {elapsed:.1f}s overall "
          f"including kill -9 + restart; {report.retries} retried requests, {report.replays} replayed labels")
    record_property("labels_per_s", round(rate, 1))


@pytest.mark.slow
def test_bigger_load_200x25(tmp_path, record_property):
    crowd, per = 200, 25
    db = str(tmp_path / "big.db")
    token = _prepare(db, n_items=2000, k=3)
    log = open(tmp_path / "server.log", "ab")
    server = ServerProcess(db, free_port(), log).start()
    try:
        report = simulate(server.url, token, "load", score_by_length,
                          spec=CrowdSpec(crowd=crowd, max_labels=per, temperature=1.0))
    finally:
        server.stop()
        log.close()
    _check_stored_once(db, report.acknowledged, crowd, per)
    print(f"\nload: {crowd} annotators x {per} labels: {report.labels_per_s:.0f} labels/s "
          f"({report.labels} labels in {report.seconds:.1f}s)")
    record_property("labels_per_s", round(report.labels_per_s, 1))
