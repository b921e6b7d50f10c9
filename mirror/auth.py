"""Upstream authentication as registries do it: Bearer tokens by scope, or Basic.

The flow is Docker Hub's: a request answered 401 carries
``WWW-Authenticate: Bearer realm=…,service=…,scope=…``; a token for that scope
comes from the realm (anonymously, or with the configured credentials) and the
request is sent once more. Tokens are cached per scope until shortly before they
expire, and once the realm is known a new scope's token is fetched before the
first request instead of after a wasted round trip.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import httpx

from .errors import Unauthorized, Unavailable

__all__ = ["Challenge", "RegistryAuth", "parse_challenge"]

_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_REPOSITORY_PATH = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags|referrers)/")
# A token is refreshed this many seconds before it expires, so a request never
# reaches the upstream with a token that dies in flight.
_EXPIRY_MARGIN = 10.0
_DEFAULT_EXPIRES_IN = 60.0


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    realm: str = ""
    service: str = ""
    scope: str = ""


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return Challenge(
        scheme, params.get("realm", ""), params.get("service", ""), params.get("scope", "")
    )


def _request_scope(request: httpx.Request) -> str:
    match = _REPOSITORY_PATH.match(request.url.path)
    return f"repository:{match.group(1)}:pull" if match else ""


class RegistryAuth(httpx.Auth):
    """Adds the right ``Authorization`` header to upstream requests.

    ``token_client`` fetches tokens; it must not itself use this auth.
    """

    def __init__(
        self,
        token_client: httpx.AsyncClient,
        username: str | None = None,
        password: str | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token_client = token_client
        self._credentials = (username, password) if username and password else None
        self._basic_header = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
            if self._credentials
            else None
        )
        self._now = now
        self._challenge: Challenge | None = None
        self._tokens: dict[str, tuple[str, float]] = {}  # scope → (token, expires at)
        self._locks: dict[str, asyncio.Lock] = {}

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        scope = _request_scope(request)
        sent = await self._authorization(scope, rejected=None)
        if sent:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401:
            return
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return
        self._challenge = challenge
        retry = await self._authorization(challenge.scope or scope, rejected=sent)
        if retry is None or retry == sent:
            return
        request.headers["Authorization"] = retry
        yield request

    async def _authorization(self, scope: str, rejected: str | None) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic_header
        cached = self._tokens.get(scope)
        if cached and cached[1] > self._now() and f"Bearer {cached[0]}" != rejected:
            return f"Bearer {cached[0]}"
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            # Another request may have fetched it while this one waited.
            cached = self._tokens.get(scope)
            if cached and cached[1] > self._now() and f"Bearer {cached[0]}" != rejected:
                return f"Bearer {cached[0]}"
            token, expires_in = await self._fetch_token(challenge, scope)
            self._tokens[scope] = (token, self._now() + max(expires_in - _EXPIRY_MARGIN, 1.0))
            return f"Bearer {token}"

    async def _fetch_token(self, challenge: Challenge, scope: str) -> tuple[str, float]:
        params = {"service": challenge.service} if challenge.service else {}
        if scope:
            params["scope"] = scope
        try:
            response = await self._token_client.get(
                challenge.realm, params=params, auth=self._credentials
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"token service unreachable: {type(exc).__name__}") from exc
        if response.status_code in (401, 403):
            raise Unauthorized("the upstream token service refused the configured credentials")
        if response.status_code != 200:
            raise Unavailable(f"token service answered {response.status_code}")
        try:
            document = response.json()
            token = document.get("token") or document.get("access_token")
            expires_in = float(document.get("expires_in") or _DEFAULT_EXPIRES_IN)
        except (ValueError, AttributeError, TypeError) as exc:
            raise Unavailable("token service sent an unreadable answer") from exc
        if not isinstance(token, str) or not token:
            raise Unavailable("token service sent no token")
        return token, expires_in
