"""Server settings: a dataclass read from keyword arguments or RLHFKIT_ANNOTATE_* environment variables
(RLHFKIT_ANNOTATE_DB, RLHFKIT_ANNOTATE_MAX_BODY_BYTES, ...), so tests pass settings to `create_app` directly."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from rlhfkit.config import coerce
from rlhfkit.errors import UserError

ENV_PREFIX = "RLHFKIT_ANNOTATE_"


@dataclass
class Settings:
    db: str = "feedback.db"
    """Database: a SQLite file path or sqlite:///path, or postgresql://user:password@host:port/database."""
    max_body_bytes: int = 2 * 1024 * 1024
    """Requests with a larger body are refused with 413 before anything is read into the app."""
    session_hours: float = 12.0
    """How long a browser login lasts."""
    cookie_secure: bool = False
    """Send cookies only over HTTPS (turn on behind a TLS proxy)."""
    login_max_failures: int = 10
    """Failed logins for one account name within login_window_s before further tries are refused (429) until the
    oldest failure is that old; 5x as many for one client address. 0: no limit."""
    login_window_s: float = 900.0
    """The sliding window of login_max_failures, in seconds."""
    title: str = "rlhfkit annotate"
    """Shown in the page header."""
    pool_size: int = 8
    """Database connections kept open (twice as many more may be opened under load)."""
    sqlite_synchronous: str = "NORMAL"
    """SQLite only. NORMAL: a committed label survives a crash of the server process; FULL: also a power loss
    (an fsync per commit, slower)."""

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = {}
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        types_ = {"str": str, "int": int, "float": float, "bool": bool}
        for name in hints:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = coerce(raw, types_[hints[name]], ENV_PREFIX + name.upper(), from_cli=True)
        unknown = set(overrides) - set(hints)
        if unknown:
            raise UserError(f"unknown setting(s) {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)
