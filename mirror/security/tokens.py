"""Bearer tokens the mirror issues at ``/token`` and verifies on every request.

A token is a JWT signed with HMAC-SHA256 (PyJWT). Its subject is the user ("" for
an anonymous client); what the user may read is decided by the access rules at
each request, so a rule change applies at once and a token is never wider than its
user. Each token also carries a keyed fingerprint of the user's password hash: a
changed password or a removed user ends every token issued before.

The signing key comes from the environment (one key for every mirror behind a load
balancer) or from a key file created once in the cache directory with mode 0600, so
that every worker process of one mirror verifies the others' tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jwt

__all__ = ["Claims", "TokenError", "TokenIssuer", "load_or_create_key"]

TokenKind = Literal["access", "refresh"]
_ISSUER = "mirror"
_ALGORITHM = "HS256"
_LEEWAY = 60  # seconds of clock skew between workers or mirrors, as distribution allows


class TokenError(Exception):
    """A token that is malformed, expired, of another kind, or signed by another key."""


@dataclass(frozen=True)
class Claims:
    user: str | None  # None: an anonymous client's token
    kind: TokenKind
    fingerprint: str  # of the password hash the token was issued against ("" if anonymous)
    expires: float


def load_or_create_key(directory: Path) -> bytes:
    """The key in ``directory/token.key``, created once (0600) if absent.

    Workers starting together race to create it: the file is written whole under a
    temporary name and linked into place, so every worker reads the one key that won.
    """
    path = directory / "token.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = directory / f".token.key.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_hex(32).encode())
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another worker won; use its key
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_bytes()


class TokenIssuer:
    def __init__(
        self,
        key: bytes,
        *,
        service: str,
        ttl: float,
        refresh_ttl: float,
        now: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 32:
            raise ValueError("a token signing key needs at least 32 bytes")
        self._key = key
        self.service = service
        self.ttl = ttl
        self.refresh_ttl = refresh_ttl
        self._now = now

    def fingerprint(self, hashed: bytes | None) -> str:
        """A keyed digest of a password hash: changes with the password, reveals nothing."""
        if hashed is None:
            return ""
        return hmac.new(self._key, hashed, hashlib.sha256).hexdigest()[:32]

    def issue(self, user: str | None, hashed: bytes | None, kind: TokenKind = "access") -> str:
        now = int(self._now())
        claims = {
            "iss": _ISSUER,
            "sub": user or "",
            "aud": self.service,
            "iat": now,
            "nbf": now,
            "exp": now + int(self.ttl if kind == "access" else self.refresh_ttl),
            "jti": uuid.uuid4().hex,
            "typ": kind,
            "pwd": self.fingerprint(hashed),
        }
        return jwt.encode(claims, self._key, algorithm=_ALGORITHM)

    def verify(self, token: str, kind: TokenKind = "access") -> Claims:
        """The token's claims; TokenError unless it is ours, of this kind, and current."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                audience=self.service,
                issuer=_ISSUER,
                # Times are checked below against the mirror's clock (tests move it).
                options={
                    "require": ["exp", "nbf", "sub", "aud", "iss"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise TokenError(str(exc)) from None
        if claims.get("typ") != kind:
            raise TokenError(f"not an {kind} token")
        now, leeway = self._now(), _LEEWAY if kind == "access" else 0
        expires = float(claims["exp"])
        if expires + leeway < now or float(claims["nbf"]) - leeway > now:
            raise TokenError("token expired or not yet valid")
        user = claims["sub"] or None
        return Claims(user, kind, str(claims.get("pwd", "")), expires)
