"""Replicas streaming blobs from one another: the internal route's credentials and its client.

A replica filling a blob from the upstream holds the fleet's lease on it; another
replica asked for the same blob streams it from the holder's fill as its bytes land
(``GET {holder}/_mirror/blobs/<digest>``), instead of going upstream or waiting for
the bucket. The route hands out cached content without any repository check, so only
replicas may use it: a request carries an HMAC of the digest and a near expiry under
the secret every replica shares, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from ..errors import Unavailable
from ..reference import Digest
from ..upstream.client import BlobResponse

__all__ = ["PEER_PATH", "PeerMissing", "Peers", "peer_authorization", "verify_peer"]

PEER_PATH = "/_mirror/blobs/"
_SCHEME = "Mirror-Peer"
_VALIDITY = 30  # seconds a signed request is good for
_MAX_CLOCK_SKEW = 60  # an expiry further ahead than this (beyond validity) is refused
_CHUNK = 1024 * 1024


def _mac(secret: str, digest: Digest, expires: int) -> str:
    message = f"{digest}|{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def peer_authorization(secret: str, digest: Digest, now: float) -> str:
    """The ``Authorization`` value of a peer request for ``digest``."""
    expires = int(now) + _VALIDITY
    return f"{_SCHEME} {expires}.{_mac(secret, digest, expires)}"


def verify_peer(secret: str, digest: Digest, header: str | None, now: float) -> bool:
    """Was the request signed with the shared secret for this digest, and is it fresh?"""
    scheme, _, token = (header or "").partition(" ")
    expires_text, _, mac = token.partition(".")
    if scheme != _SCHEME or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    if not now <= expires <= now + _VALIDITY + _MAX_CLOCK_SKEW:
        return False
    return hmac.compare_digest(_mac(secret, digest, expires).encode(), mac.encode())


class PeerMissing(Unavailable):
    """The holder has neither a fill nor a copy of the blob (not yet, or no more)."""


class Peers:
    """Streams blobs from other replicas' fills."""

    def __init__(
        self,
        secret: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        read_timeout: float = 60.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self._now = now
        self._client = httpx.AsyncClient(
            transport=transport,
            trust_env=False,  # a peer is reached directly, never through a proxy
            timeout=httpx.Timeout(read_timeout, connect=2.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def open_blob(
        self, holder: str, digest: Digest, start: int = 0
    ) -> AsyncIterator[BlobResponse]:
        """The blob from byte ``start`` as the holder has it. ``PeerMissing`` when it has
        nothing; ``Unavailable`` when it cannot be reached, or breaks off (the holder died):
        the reader then never sees a clean end."""
        headers = {"Authorization": peer_authorization(self._secret, digest, self._now())}
        if start:
            headers["Range"] = f"bytes={start}-"
        request = self._client.build_request(
            "GET", f"{holder.rstrip('/')}{PEER_PATH}{digest}", headers=headers
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise Unavailable(f"replica {holder} is unreachable: {type(exc).__name__}") from exc
        try:
            if response.status_code == 404:
                raise PeerMissing(f"replica {holder} has no fill of blob {digest}")
            if response.status_code != (206 if start else 200):
                raise Unavailable(f"replica {holder} answered {response.status_code} for {digest}")
            length = response.headers.get("Content-Length")
            size = int(length) if length is not None and length.isdigit() else None

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    pending: list[bytes] = []
                    pending_size = 0
                    async for piece in response.aiter_raw():
                        pending.append(piece)
                        pending_size += len(piece)
                        if pending_size >= _CHUNK:
                            yield b"".join(pending)
                            pending, pending_size = [], 0
                    if pending:
                        yield b"".join(pending)
                except httpx.HTTPError as exc:
                    raise Unavailable(
                        f"replica {holder} broke off blob {digest}: {type(exc).__name__}"
                    ) from exc

            yield BlobResponse(size, chunks())
        finally:
            await response.aclose()
