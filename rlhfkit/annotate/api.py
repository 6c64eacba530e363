"""Python API: run the annotation server inside a script and close the RLHF loop without humans.

    from rlhfkit.annotate.api import collect_preferences
    result = collect_preferences("candidates.jsonl", "prefs.jsonl", preference=my_score_fn,
                                 crowd=5, k=3, temperature=1.0, db="runs/loop/feedback.db")
    # prefs.jsonl is ready for rlhfkit.data.load_preferences (reward model / DPO)

or step by step:

    with LocalServer("runs/fb.db") as server:            # uvicorn in a background thread, free port
        token = server.admin_token()                       # creates (or re-keys) the user "admin"
        server.create_project("p", kinds=["pairwise"], k=3)
        server.import_file("p", "candidates.jsonl")
        report = simulate(server.url, token, "p", my_score_fn, spec=CrowdSpec(crowd=5))
        export_project(server.store, project="p", kind="preferences", output="prefs.jsonl")
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from rlhfkit.annotate.errors import ApiError
from rlhfkit.annotate.export import export_project
from rlhfkit.annotate.importer import items_from_source
from rlhfkit.annotate.schemas import ProjectCreate
from rlhfkit.annotate.settings import Settings
from rlhfkit.annotate.simulate import CrowdSpec, SimReport, simulate
from rlhfkit.annotate.store import Store
from rlhfkit.errors import UserError

__all__ = ["LocalServer", "collect_preferences", "import_candidates", "ensure_project", "simulate", "CrowdSpec",
           "SimReport", "export_project"]


def ensure_project(store: Store, name: str, **options) -> Any:
    """The project `name`, created with `options` (ProjectCreate fields) if it does not exist."""
    try:
        return store.get_project(name=name)
    except ApiError:
        spec = ProjectCreate(name=name, **options)
        return store.create_project(**spec.model_dump())


def import_candidates(store: Store, project: str, source: Any, *, shuffle_pairs: bool = True,
                      pairs: str = "all") -> dict:
    """Import a candidates file (or list of dicts) into a project, all or nothing; idempotent."""
    proj = store.get_project(name=project)
    items, n = items_from_source(source, proj, shuffle_pairs=shuffle_pairs, pairs=pairs)
    added, present = store.import_items(project_id=proj.id, items=items)
    return {"records": n, "items": len(items), "added": added, "already_present": present}


class LocalServer:
    """The annotation app under uvicorn in a daemon thread, on 127.0.0.1 and a free port (or `port`)."""

    def __init__(self, db: str, *, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None):
        self.settings = settings or Settings(db=db)
        self.settings.db = db
        self.host, self.port = host, port
        self.store: Store | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "LocalServer":
        import uvicorn

        from rlhfkit.annotate.main import create_app

        self.store = Store(self.settings.db, pool_size=self.settings.pool_size,
                           sqlite_synchronous=self.settings.sqlite_synchronous)
        app = create_app(self.settings, store=self.store)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="rlhfkit-annotate", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the annotation server did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def admin_token(self, name: str = "admin") -> str:
        """An API token for admin user `name` (created if missing; an existing user gets a new token)."""
        user = self.store.user_by_name(name)
        if user is None:
            return self.store.create_user(name=name, role="admin")[1]
        if not user.is_admin:
            raise UserError(f"user {name!r} exists and is not an admin")
        return self.store.new_token(name=name)

    def create_project(self, name: str, **options) -> Any:
        return ensure_project(self.store, name, **options)

    def import_file(self, project: str, source: Any, **kw) -> dict:
        return import_candidates(self.store, project, source, **kw)


def collect_preferences(candidates: Any, output: str | os.PathLike, preference: Callable, *, db: str | None = None,
                        project: str = "feedback", k: int = 3, crowd: int = 5, temperature: float = 1.0,
                        length_bias: float = 0.0, position_bias: float = 0.0, tie_margin: float = 0.0,
                        seed: int = 0, mode: str = "majority", pairs: str = "all",
                        max_labels: int = 0) -> dict:
    """generate output -> import -> simulated crowd over HTTP -> preference JSONL, in one call.

    candidates: a {"prompt", "completions": [...]} file (rlhfkit generate) or a list of such dicts.
    preference: fn(prompts, completions) -> list[float], the crowd's hidden utility.
    db: a SQLite file or postgresql:// URL (default: a fresh temporary SQLite file).
    Returns {"output", "rows", "skipped", "import": {...}, "simulation": SimReport.to_dict(), "db"}."""
    tmp = None
    if db is None:
        tmp = tempfile.mkdtemp(prefix="rlhfkit-annotate-")
        db = str(Path(tmp) / "feedback.db")
    with LocalServer(db) as server:
        server.create_project(project, kinds=["pairwise"], k=k, gold_rate=0.0)
        imported = server.import_file(project, candidates, pairs=pairs)
        spec = CrowdSpec(crowd=crowd, temperature=temperature, length_bias=length_bias, position_bias=position_bias,
                         tie_margin=tie_margin, seed=seed, max_labels=max_labels)
        report = simulate(server.url, server.admin_token("sim-admin"), project, preference, spec=spec)
        out = export_project(server.store, project=project, kind="preferences", output=str(output), mode=mode)
    return {**out, "import": imported, "simulation": report.to_dict(), "db": db}
