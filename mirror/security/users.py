"""Users from an htpasswd file with bcrypt hashes (what ``htpasswd -B`` writes and
CNCF distribution reads), and the check of a user's password.

bcrypt is slow by design (tens of milliseconds): it runs in a worker thread, a few
at a time, never on the event loop. A successful check is remembered for a minute,
keyed by a keyed hash of the credentials, so that a pull of 30 blobs with Basic
credentials costs one bcrypt run, not 30; concurrent checks of the same
credentials share one run. A remembered success holds only while the user's line
in the file is unchanged: a new password or a removed user takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import bcrypt

from ..singleflight import SingleFlight

__all__ = ["Users", "parse_htpasswd"]

log = logging.getLogger("mirror.security")

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_REMEMBER_SECONDS = 60.0
_REMEMBER_MAX = 4096
_CONCURRENT_CHECKS = 4  # bcrypt runs at once: wrong passwords must not take every thread
# Checked for a user who does not exist, so that such a login takes as long as a wrong
# password (the cost htpasswd -B uses) and does not tell which users exist.
_NOBODY = b"$2b$05$LhK3lZY6iG60CVYY1hMG3.RMs8HJJLKGEaA7dQNffktsV8b3pYcFy"


def parse_htpasswd(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    """``user:hash`` lines → {user: bcrypt hash}. Other hash kinds are left out,
    with a warning naming the user (never the hash)."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            log.warning("%s line %d is not user:hash; ignored", source, number)
            continue
        if not hashed.startswith(_BCRYPT_PREFIXES):
            log.warning("%s: user %r has no bcrypt hash (htpasswd -B); ignored", source, user)
            continue
        users[user] = hashed.encode()
    return users


@dataclass(frozen=True)
class _Remembered:
    user: str
    hashed: bytes  # the line it was checked against
    until: float


class Users:
    """The users of an htpasswd file, reread when the file changes."""

    def __init__(self, path: Path, *, now: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._now = now
        self._signature: tuple[int, int, int] | None = None
        self._users: dict[str, bytes] = {}
        self._key = secrets.token_bytes(32)  # keys the memory of good credentials
        self._remembered: dict[bytes, _Remembered] = {}
        self._checks: SingleFlight[bool] = SingleFlight()
        self._limiter = anyio.CapacityLimiter(_CONCURRENT_CHECKS)
        self._reload()

    def _reload(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            if self._signature is None:
                raise
            log.warning("cannot read %s (%s); keeping the users read before", self.path, exc)
            return
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._signature:
            return
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            if self._signature is None:
                raise
            log.warning("cannot read %s (%s); keeping the users read before", self.path, exc)
            return
        self._users = parse_htpasswd(text, str(self.path))
        self._signature = signature
        if not self._users:
            log.warning("%s names no user with a bcrypt hash: nobody can log in", self.path)

    def hashed(self, user: str) -> bytes | None:
        """The user's current bcrypt hash (None: no such user); rereads a changed file."""
        self._reload()
        return self._users.get(user)

    def exists(self, user: str) -> bool:
        return self.hashed(user) is not None

    def remembered(self, user: str, password: str) -> bool:
        """Whether these credentials were checked good recently (no bcrypt run)."""
        hashed = self.hashed(user)
        entry = self._remembered.get(self._credential_key(user, password))
        return (
            hashed is not None
            and entry is not None
            and entry.user == user
            and hmac.compare_digest(entry.hashed, hashed)
            and entry.until > self._now()
        )

    async def check(self, user: str, password: str) -> bool:
        """Whether the password is the user's. Runs bcrypt off the event loop."""
        hashed = self.hashed(user)
        if hashed is None:
            await anyio.to_thread.run_sync(
                _checkpw, password.encode(), _NOBODY, limiter=self._limiter
            )
            return False
        if self.remembered(user, password):
            return True
        key = self._credential_key(user, password)

        async def run() -> bool:
            return await anyio.to_thread.run_sync(
                _checkpw, password.encode(), hashed, limiter=self._limiter
            )

        good, _ = await self._checks.do((key, hashed), run)
        if good:
            self._remember(key, _Remembered(user, hashed, self._now() + _REMEMBER_SECONDS))
        return good

    def _credential_key(self, user: str, password: str) -> bytes:
        message = user.encode() + b"\0" + password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _remember(self, key: bytes, entry: _Remembered) -> None:
        if len(self._remembered) >= _REMEMBER_MAX:
            now = self._now()
            self._remembered = {k: v for k, v in self._remembered.items() if v.until > now}
            if len(self._remembered) >= _REMEMBER_MAX:
                self._remembered.clear()
        self._remembered[key] = entry


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a malformed hash in the file
        return False
