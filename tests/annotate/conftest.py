"""Fixtures for the annotation app: SQLite and (when .ci/services.sh started it) PostgreSQL stores, a TestClient
app with an admin and annotators, and candidate records in `rlhfkit generate` format."""

from __future__ import annotations

import pytest
from annotate_helpers import CANDIDATES, PG_URL, make_project, pg_reason, reset_pg


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database URL: a SQLite file, then the PostgreSQL test database (skipped, with the reason, if the
    server is not running)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    reason = pg_reason()
    if reason:
        pytest.skip(reason)
    reset_pg()
    return PG_URL


@pytest.fixture
def store(db_url):
    from rlhfkit.annotate.store import Store

    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def app(tmp_path, monkeypatch):
    """(TestClient, ids) with users admin/ann1/ann2 (passwords pw-admin, pw1, pw2; ann1 and ann2 in project p,
    ann3 in no project) and project p (pairwise+rating+edit, k=2, criteria helpful/fluent) with CANDIDATES."""
    from fastapi.testclient import TestClient

    from rlhfkit.annotate.api import import_candidates
    from rlhfkit.annotate.main import create_app
    from rlhfkit.annotate.settings import Settings

    from rlhfkit.annotate import security

    monkeypatch.setattr(security, "SCRYPT_N", 2**10)  # fast test logins; the hash records its own parameters
    application = create_app(Settings(db=str(tmp_path / "fb.db"), max_body_bytes=256 * 1024))
    store = application.state.store
    project = make_project(store, "p", kinds=["pairwise", "rating", "edit"], k=2, criteria=["helpful", "fluent"],
                           gold_rate=0.0)
    make_project(store, "other", kinds=["pairwise"])
    import_candidates(store, "other", CANDIDATES)
    tokens = {}
    for name, role, pw in [("admin", "admin", "pw-admin"), ("ann1", "annotator", "pw1"),
                           ("ann2", "annotator", "pw2"), ("ann3", "annotator", "pw3")]:
        user, tokens[name] = store.create_user(name=name, role=role, password=pw)
        if name in ("ann1", "ann2"):
            store.add_member(project_id=project.id, user_id=user.id)
    import_candidates(store, "p", CANDIDATES)
    with TestClient(application) as client:
        client.tokens = tokens
        client.store = store
        client.project = project
        client.hdr = lambda name: {"Authorization": f"Bearer {tokens[name]}"}
        yield client
