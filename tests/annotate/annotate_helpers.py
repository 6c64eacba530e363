"""Helpers shared by the annotation tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

PG_URL = os.environ.get("RLHFKIT_TEST_PG_URL", "postgresql://rlhfkit:rlhfkit@127.0.0.1:5432/rlhfkit_test")


def pg_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when the server answers."""
    try:
        import psycopg
    except ImportError as err:
        return f"psycopg not installed ({err})"
    try:
        psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3).close()
    except Exception as err:  # noqa: BLE001 - any failure means no server
        return (f"PostgreSQL not reachable at {PG_URL} ({str(err).strip().splitlines()[0]}); "
                "run .ci/services.sh (installs and starts it from Debian's packages) or set RLHFKIT_TEST_PG_URL")
    return None


def reset_pg() -> None:
    """Drop the annotation tables so each test starts from an empty database."""
    from sqlalchemy import create_engine

    from rlhfkit.annotate.store import normalize_url
    from rlhfkit.annotate.tables import metadata

    engine = create_engine(normalize_url(PG_URL))
    metadata.drop_all(engine)
    engine.dispose()


def make_project(store, name="p", **options):
    from rlhfkit.annotate.api import ensure_project

    return ensure_project(store, name, **options)


CANDIDATES = [
    {"prompt": "Once upon a time", "completions": ["there was a cat.", "there was a big happy dog who ran."]},
    {"prompt": "Lily went to the park", "completions": ["She saw a bird.", "She played on the swings all day long."]},
    {"prompt": [{"role": "user", "content": "Tell me a story."}],
     "completions": ["Tom had a red ball.", "Tom had a red ball and a blue kite that flew high."]},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`rlhfkit annotate serve` in a subprocess (so a test can kill -9 it)."""

    def __init__(self, db: str, port: int, log):
        self.db, self.port, self.log = db, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "annotate", "serve", f"db={self.db}",
                                      f"port={self.port}", "log_level=warning"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start in 30 s")

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown handlers, no flush
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
