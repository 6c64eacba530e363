"""Passwords, API tokens, session ids and CSRF tokens (stdlib only).

Passwords are hashed with scrypt (RFC 7914; n=2**14, r=8, p=1, 16-byte salt), the parameters stored with the
hash so they can be raised later. API tokens and session ids are 32 random bytes; the database keeps only their
SHA-256, so a leaked database does not leak credentials. Browser logins are rate-limited (LoginLimiter).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        algo, n, r, p, salt, digest = stored.split("$")
        if algo != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def new_secret() -> str:
    """A random URL-safe token (API token, session id, CSRF token)."""
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What the database stores for a token or session id."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class LoginLimiter:
    """Failed browser logins counted per account name and per client address over a sliding window.

    After `max_failures` failures for a name within `window_s` seconds (5x as many for an address, so one office
    behind a NAT is not locked out by one person), further attempts for it are refused without checking the
    password until its oldest failure leaves the window. A successful login clears the name's count. In memory,
    per server process; at most `max_keys` names/addresses are tracked (the stalest are dropped first).
    max_failures = 0 turns it off."""

    def __init__(self, max_failures: int, window_s: float, clock=time.monotonic, max_keys: int = 100_000):
        self.max_failures, self.window_s, self.clock, self.max_keys = max_failures, window_s, clock, max_keys
        self._failures: OrderedDict[tuple[str, str], deque] = OrderedDict()
        self._lock = threading.Lock()

    def _limit(self, key: tuple[str, str]) -> int:
        return self.max_failures * (5 if key[0] == "address" else 1)

    def _recent(self, key: tuple[str, str], now: float) -> deque:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def retry_after(self, name: str, address: str) -> float:
        """Seconds until a login for this name from this address may be tried; 0 if allowed now."""
        if self.max_failures <= 0:
            return 0.0
        now, wait = self.clock(), 0.0
        with self._lock:
            for key in (("name", name.lower()), ("address", address)):
                times = self._recent(key, now)
                if len(times) >= self._limit(key):
                    wait = max(wait, times[len(times) - self._limit(key)] + self.window_s - now)
        return wait

    def failed(self, name: str, address: str) -> None:
        if self.max_failures <= 0:
            return
        now = self.clock()
        with self._lock:
            for key in (("name", name.lower()), ("address", address)):
                times = self._recent(key, now)
                times.append(now)
                self._failures[key] = times
                self._failures.move_to_end(key)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(("name", name.lower()), None)
