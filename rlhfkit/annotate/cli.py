"""`rlhfkit annotate ...`: the human-feedback server and its admin commands.

    rlhfkit annotate serve db=feedback.db port=8000                        # web UI + JSON API under /api/
    rlhfkit annotate user add alice role=annotator password=... projects=p  # prints alice's API token
    rlhfkit annotate user deactivate alice db=feedback.db                   # undo=true reactivates
    rlhfkit annotate project add p kinds=pairwise,rating k=3 criteria=helpfulness,harmlessness
    rlhfkit annotate import candidates.jsonl db=feedback.db project=p       # rlhfkit generate output
    rlhfkit annotate simulate db=feedback.db project=p preference=prefs.py:score crowd=5 temperature=1
    rlhfkit annotate export db=feedback.db project=p kind=preferences mode=majority output=prefs.jsonl
    rlhfkit annotate stats db=feedback.db project=p        # progress, per-annotator counts, gold accuracy
    rlhfkit annotate agreement db=feedback.db project=p    # percent agreement, Krippendorff's alpha, per pair

db is a SQLite file (WAL mode) or a postgresql://user:password@host:port/database URL. See docs/annotate.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from rlhfkit.annotate.errors import ApiError
from rlhfkit.errors import UserError


@dataclass
class ServeConfig:
    db: str = "feedback.db"
    """SQLite file (or sqlite:///path) or postgresql://user:password@host:port/database."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for every interface: put TLS in front and set cookie_secure=true)."""
    port: int = 8000
    """TCP port."""
    max_body_bytes: int = 2 * 1024 * 1024
    """Larger request bodies are refused with 413."""
    session_hours: float = 12.0
    """How long a browser login lasts."""
    cookie_secure: bool = False
    """Send cookies over HTTPS only."""
    login_max_failures: int = 10
    """Failed logins per account name within login_window_s before further tries get 429 (5x per client
    address); 0: no limit."""
    login_window_s: float = 900.0
    """Sliding window of login_max_failures, in seconds."""
    pool_size: int = 8
    """Database connections kept open."""
    sqlite_synchronous: str = "NORMAL"
    """SQLite: NORMAL survives a crash/kill of the server; FULL also a power loss (fsync per commit, slower)."""
    log_level: str = "info"
    """uvicorn log level: critical, error, warning, info, debug."""
    access_log: bool = False
    """Log every request."""

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"port: expected 0..65535, got {self.port}")
        if self.login_max_failures < 0 or self.login_window_s <= 0:
            raise UserError("login_max_failures must be >= 0 and login_window_s > 0")


@dataclass
class ProjectAddConfig:
    positional = ("name",)
    name: str = ""
    """Project name (letters, digits, _ . @ -)."""
    db: str = "feedback.db"
    """Database (SQLite file or postgresql:// URL)."""
    kinds: list[str] = field(default_factory=lambda: ["pairwise"])
    """Label kinds collected: pairwise, rating, edit (comma list)."""
    k: int = 3
    """Distinct annotators per item."""
    scale_min: int = 1
    """Lowest rating."""
    scale_max: int = 7
    """Highest rating."""
    criteria: list[str] = field(default_factory=lambda: ["overall"])
    """Rating criteria, each rated on the scale (comma list, e.g. helpfulness,harmlessness,fluency)."""
    lease_seconds: int = 600
    """An item handed to an annotator returns to the queue after this long without a label."""
    gold_rate: float = 0.1
    """Share of an annotator's tasks drawn from gold items (items imported with a known answer)."""
    instructions: str = ""
    """Guidelines shown above every task."""

    def validate(self) -> None:
        if not self.name:
            raise UserError("name: required, e.g. rlhfkit annotate project add my-project")


@dataclass
class ImportConfig:
    positional = ("file",)
    file: str = ""
    """Candidates: JSONL of {"prompt", "completions": [...]} (rlhfkit generate), {"prompt", "completion"} or
    {"prompt", "chosen", "rejected"}; optional "gold" (A|B|tie|both_bad) or "gold_score"."""
    db: str = "feedback.db"
    """Database (SQLite file or postgresql:// URL)."""
    project: str = ""
    """Project to add the items to; created as a pairwise project with k=3 if it does not exist."""
    pairs: str = "all"
    """With more than 2 completions per prompt, which pairs to compare: all, adjacent or first."""
    shuffle_pairs: bool = True
    """Randomize (deterministically) which completion of a pair is shown as A."""

    def validate(self) -> None:
        if not self.file:
            raise UserError("file: required (a candidates JSONL file)")
        if not self.project:
            raise UserError("project: required")
        if self.pairs not in ("all", "adjacent", "first"):
            raise UserError(f"pairs: expected all, adjacent or first, got {self.pairs!r}")


@dataclass
class ExportConfig:
    db: str = "feedback.db"
    """Database (SQLite file or postgresql:// URL)."""
    project: str = ""
    """Project to export."""
    kind: str = "preferences"
    """preferences, ratings, edits (prompt/completion/edited) or edit_pairs (edited > original as preferences)."""
    mode: str = "majority"
    """majority: one row per item by majority vote (mean for ratings); all: one row per vote, with annotator, time."""
    output: str = ""
    """JSONL file to write (.gz compresses)."""
    ties: bool = False
    """Also write tie and both-bad outcomes (with "label": tie|both_bad)."""
    min_votes: int = 1
    """Only items with at least this many labels."""
    criterion: str = ""
    """Ratings: the criterion used as "score" (default: the mean over criteria)."""
    edits: bool = False
    """Preferences: append the edit pairs (edited > original)."""

    def validate(self) -> None:
        from rlhfkit.annotate.export import EXPORT_KINDS
        from rlhfkit.data import check_jsonl_output

        if not self.project:
            raise UserError("project: required")
        if not self.output:
            raise UserError("output: required (the JSONL file to write)")
        check_jsonl_output(self.output, "output")
        if self.kind not in EXPORT_KINDS:
            raise UserError(f"kind: expected one of {', '.join(EXPORT_KINDS)}, got {self.kind!r}")
        if self.mode not in ("majority", "all"):
            raise UserError(f"mode: expected majority or all, got {self.mode!r}")
        if self.min_votes < 1:
            raise UserError(f"min_votes: must be >= 1, got {self.min_votes}")


@dataclass
class SimulateConfig:
    project: str = ""
    """Project to label."""
    preference: str = ""
    """The crowd's utility: path/to/file.py:function or module:function, fn(prompts, completions) -> list[float]."""
    url: str = ""
    """Server to label through; empty starts one in-process on `db` (same HTTP API, random local port)."""
    token: str = ""
    """Admin API token for `url` (or the env var RLHFKIT_ANNOTATE_TOKEN); not needed without url."""
    db: str = "feedback.db"
    """Database for the in-process server (when url is empty)."""
    crowd: int = 5
    """Number of simulated annotators, labelling concurrently."""
    temperature: float = 1.0
    """Bradley-Terry temperature: P(A) = sigmoid((u_A - u_B) / T); 0 labels by the utility alone."""
    length_bias: float = 0.0
    """Utility added per word of a completion (a crowd that prefers longer answers)."""
    position_bias: float = 0.0
    """Utility added to the left completion (A)."""
    tie_margin: float = 0.0
    """Labels a tie when the noisy utility difference is within this margin."""
    rating_spread: float = 1.0
    """Utility units that move a rating across the middle of the scale."""
    max_labels: int = 0
    """Labels per annotator (0: until the queue is empty)."""
    edit_function: str = ""
    """Optional fn(prompts, completions) -> list[str] that writes edits; without it edit items are skipped."""
    seed: int = 0
    """Noise seed."""
    name_prefix: str = "sim"
    """Simulated annotators are users PREFIX0..PREFIX{crowd-1}."""
    report: str = ""
    """Also write the report as JSON to this file."""

    def validate(self) -> None:
        if not self.project:
            raise UserError("project: required")
        if not self.preference:
            raise UserError("preference: required (path/to/file.py:function returning one score per completion)")
        if self.crowd < 1:
            raise UserError(f"crowd: must be >= 1, got {self.crowd}")
        if self.temperature < 0:
            raise UserError(f"temperature: must be >= 0, got {self.temperature}")


@dataclass
class UserAddConfig:
    positional = ("name",)
    name: str = ""
    """User name (letters, digits, _ . @ -)."""
    role: str = "annotator"
    """admin or annotator."""
    db: str = "feedback.db"
    """Database (SQLite file or postgresql:// URL)."""
    password: str = ""
    """Password for the web login (empty: API token only). Prefer password_env: argv is visible to other users."""
    password_env: str = ""
    """Read the password from this environment variable."""
    projects: list[str] = field(default_factory=list)
    """Projects the user may annotate (comma list)."""

    def validate(self) -> None:
        if not self.name:
            raise UserError("name: required, e.g. rlhfkit annotate user add alice role=annotator")
        if self.role not in ("admin", "annotator"):
            raise UserError(f"role: expected admin or annotator, got {self.role!r}")


@dataclass
class UserTokenConfig:
    positional = ("name",)
    name: str = ""
    """User whose API token is replaced (the old one stops working)."""
    db: str = "feedback.db"
    """Database."""


@dataclass
class UserDeactivateConfig:
    positional = ("name",)
    name: str = ""
    """User to deactivate: API token, password and sessions stop working, leased items return to the queue; the
    user's labels are kept."""
    db: str = "feedback.db"
    """Database."""
    undo: bool = False
    """Reactivate instead (token and password work again)."""


@dataclass
class UserListConfig:
    db: str = "feedback.db"
    """Database."""


@dataclass
class StatsConfig:
    db: str = "feedback.db"
    """Database."""
    project: str = ""
    """Project (empty: every project)."""


@dataclass
class AgreementConfig:
    db: str = "feedback.db"
    """Database."""
    project: str = ""
    """Project."""

    def validate(self) -> None:
        if not self.project:
            raise UserError("project: required")


@dataclass
class MigrateConfig:
    db: str = "feedback.db"
    """Database to upgrade to this rlhfkit's schema version (back it up first)."""


# ----------------------------------------------------------------------------------------------------------------


def _store(db: str, **kw):
    from rlhfkit.annotate.store import Store

    return Store(db, **kw)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def serve(cfg: ServeConfig) -> dict:
    import uvicorn

    from rlhfkit.annotate.main import create_app
    from rlhfkit.annotate.settings import Settings

    settings = Settings(db=cfg.db, max_body_bytes=cfg.max_body_bytes, session_hours=cfg.session_hours,
                        cookie_secure=cfg.cookie_secure, pool_size=cfg.pool_size,
                        login_max_failures=cfg.login_max_failures, login_window_s=cfg.login_window_s,
                        sqlite_synchronous=cfg.sqlite_synchronous)
    app = create_app(settings)
    print(f"annotate: serving {app.state.store.safe_url} on http://{cfg.host}:{cfg.port} (JSON API under /api/)",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log)
    return {"db": cfg.db, "port": cfg.port}


def project_add(cfg: ProjectAddConfig) -> dict:
    from pydantic import ValidationError

    from rlhfkit.annotate.schemas import ProjectCreate, pydantic_message

    try:
        spec = ProjectCreate(name=cfg.name, kinds=cfg.kinds, k=cfg.k, scale_min=cfg.scale_min,
                             scale_max=cfg.scale_max, criteria=cfg.criteria, lease_seconds=cfg.lease_seconds,
                             gold_rate=cfg.gold_rate, instructions=cfg.instructions)
    except ValidationError as err:
        raise UserError(pydantic_message(err.errors())) from None
    store = _store(cfg.db)
    try:
        project = store.create_project(**spec.model_dump())
    finally:
        store.close()
    print(f"annotate: created project {project.name!r} (id {project.id}, kinds {', '.join(project.kinds)}, "
          f"k={project.k})")
    return project.public()


def import_(cfg: ImportConfig) -> dict:
    from rlhfkit.annotate.api import ensure_project, import_candidates

    store = _store(cfg.db)
    try:
        ensure_project(store, cfg.project)
        out = import_candidates(store, cfg.project, cfg.file, shuffle_pairs=cfg.shuffle_pairs, pairs=cfg.pairs)
    finally:
        store.close()
    print(f"annotate: {cfg.file}: {out['records']} records -> {out['items']} items; added {out['added']}, "
          f"{out['already_present']} already in project {cfg.project!r}")
    return out


def export(cfg: ExportConfig) -> dict:
    from rlhfkit.annotate.export import export_project

    opts: dict = {"mode": cfg.mode, "min_votes": cfg.min_votes}
    if cfg.kind == "preferences":
        opts.update(ties=cfg.ties, edits=cfg.edits)
    elif cfg.kind == "ratings":
        opts["criterion"] = cfg.criterion
    else:
        opts = {}
    store = _store(cfg.db, create=False)
    try:
        out = export_project(store, project=cfg.project, kind=cfg.kind, output=cfg.output, **opts)
    finally:
        store.close()
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in out["skipped"].items())
    print(f"annotate: wrote {out['rows']} {cfg.kind} rows to {cfg.output}" + (f" (skipped: {skipped})" if skipped
                                                                               else ""))
    return out


def simulate(cfg: SimulateConfig) -> dict:
    from rlhfkit.annotate.simulate import CrowdSpec
    from rlhfkit.annotate.simulate import simulate as run_crowd
    from rlhfkit.plugins import load_function

    fn = load_function(cfg.preference, "preference")
    edit_fn = load_function(cfg.edit_function, "edit_function") if cfg.edit_function else None
    spec = CrowdSpec(crowd=cfg.crowd, temperature=cfg.temperature, length_bias=cfg.length_bias,
                     position_bias=cfg.position_bias, tie_margin=cfg.tie_margin, rating_spread=cfg.rating_spread,
                     max_labels=cfg.max_labels, seed=cfg.seed, name_prefix=cfg.name_prefix)
    if cfg.url:
        token = cfg.token or os.environ.get("RLHFKIT_ANNOTATE_TOKEN", "")
        if not token:
            raise UserError("token: an admin API token is required with url= (or set RLHFKIT_ANNOTATE_TOKEN)")
        report = run_crowd(cfg.url, token, cfg.project, fn, spec=spec, edit_function=edit_fn)
    else:
        from rlhfkit.annotate.api import LocalServer

        with LocalServer(cfg.db) as server:
            server.store.get_project(name=cfg.project)
            report = run_crowd(server.url, server.admin_token(f"{cfg.name_prefix}-admin"), cfg.project, fn,
                               spec=spec, edit_function=edit_fn)
    print(f"annotate: simulated {cfg.crowd} annotators: {report.summary()}")
    out = report.to_dict()
    if cfg.report:
        from rlhfkit.config import atomic_write_text

        atomic_write_text(cfg.report, json.dumps(out, indent=2) + "\n")
    return out


def user_add(cfg: UserAddConfig) -> dict:
    password = cfg.password
    if cfg.password_env:
        password = os.environ.get(cfg.password_env, "")
        if not password:
            raise UserError(f"password_env: environment variable {cfg.password_env} is empty or unset")
    from rlhfkit.annotate.schemas import NAME_PATTERN

    import re

    if not re.match(NAME_PATTERN, cfg.name):
        raise UserError(f"name: {cfg.name!r} is not a valid user name (letters, digits, _ . @ -; at most 100)")
    store = _store(cfg.db)
    try:
        projects = [store.get_project(name=p) for p in cfg.projects]
        user, token = store.create_user(name=cfg.name, role=cfg.role, password=password or None)
        for p in projects:
            store.add_member(project_id=p.id, user_id=user.id)
    finally:
        store.close()
    print(token)
    return {"name": user.name, "role": user.role, "token": token}


def user_token(cfg: UserTokenConfig) -> dict:
    store = _store(cfg.db, create=False)
    try:
        token = store.new_token(name=cfg.name)
    finally:
        store.close()
    print(token)
    return {"name": cfg.name, "token": token}


def user_deactivate(cfg: UserDeactivateConfig) -> dict:
    if not cfg.name:
        raise UserError("name: required, e.g. rlhfkit annotate user deactivate alice db=feedback.db")
    store = _store(cfg.db, create=False)
    try:
        changed = store.set_active(name=cfg.name, active=cfg.undo)
    finally:
        store.close()
    state = "active" if cfg.undo else "deactivated"
    print(f"user {cfg.name}: {state}" + ("" if changed else " already"))
    return {"name": cfg.name, "active": cfg.undo, "changed": changed}


def user_list(cfg: UserListConfig) -> dict:
    store = _store(cfg.db, create=False)
    try:
        users = store.list_users()
    finally:
        store.close()
    for u in users:
        print(f"{u['name']}\t{u['role']}" + ("" if u["active"] else "\tdeactivated"))
    return {"users": users}


def stats(cfg: StatsConfig) -> dict:
    from rlhfkit.annotate.schemas import User

    store = _store(cfg.db, create=False)
    try:
        projects = ([store.get_project(name=cfg.project)] if cfg.project
                    else store.list_projects(user=User(0, "", "admin")))
        out = {p.name: {"progress": store.progress(project_id=p.id),
                        "annotators": store.annotator_stats(project_id=p.id)} for p in projects}
    finally:
        store.close()
    _print(out)
    return out


def agreement(cfg: AgreementConfig) -> dict:
    from rlhfkit.annotate.agreement import project_agreement

    store = _store(cfg.db, create=False)
    try:
        out = project_agreement(store.labels(project_id=store.get_project(name=cfg.project).id))
    finally:
        store.close()
    _print(out)
    return out


def migrate(cfg: MigrateConfig) -> dict:
    store = _store(cfg.db, create=False, migrate=True)
    try:
        version = store.schema_version()
    finally:
        store.close()
    print(f"annotate: {cfg.db} is at schema version {version}")
    return {"schema_version": version}


HANDLERS = {ServeConfig: serve, ProjectAddConfig: project_add, ImportConfig: import_, ExportConfig: export,
            SimulateConfig: simulate, UserAddConfig: user_add, UserTokenConfig: user_token,
            UserDeactivateConfig: user_deactivate,
            UserListConfig: user_list, StatsConfig: stats, AgreementConfig: agreement, MigrateConfig: migrate}


def main(cfg, argv: list[str] | None = None) -> dict:
    try:
        return HANDLERS[type(cfg)](cfg)
    except ApiError as err:  # the store's 404/409 answers are user errors on the command line
        raise UserError(err.detail) from None

