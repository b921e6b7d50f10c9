"""Upstream authentication as registries do it: Bearer tokens by scope, or Basic.

The flow is Docker Hub's: a request answered 401 carries
``WWW-Authenticate: Bearer realm=…,service=…,scope=…``; a token for that scope
comes from the realm (anonymously, or with the configured credentials) and the
request is sent once more. Tokens are cached per scope until shortly before they
expire, and once the realm is known a new scope's token is fetched before the
first request instead of after a wasted round trip.

Credentials go only where they belong (distribution's proxy and containerd key
them by host the same way):

- a challenge is honoured only on a response from the upstream's own origin
  (scheme, host, port of its ``url``): blob storage a GET was redirected to
  may answer 401 with any realm it likes, and is not listened to;
- the realm is taken only from those challenges, and used only when it is on
  the upstream's own host (any port) or listed in the upstream's
  ``auth_realms``; an ``https`` upstream never sends anything to an ``http``
  realm. Any other realm is refused with an error, and nothing is sent to it;
- credentials and tokens are only ever added to requests for the upstream's
  origin; httpx drops ``Authorization`` on a redirect that leaves it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass

import httpx

from ..errors import Unavailable, UpstreamRefused

__all__ = ["Challenge", "RegistryAuth", "parse_challenges", "realm_allowed"]

log = logging.getLogger("mirror.auth")

# One item of a challenge list (RFC 9110 §11.6.1): an auth-param, or an auth-scheme
# (a token not followed by "="), which starts the next challenge.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_ITEM = re.compile(rf'\s*,?\s*(?:({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)|({_TOKEN}))')
_REPOSITORY_PATH = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags|referrers)/")
# A token is refreshed this many seconds before it expires, so a request never
# reaches the upstream with a token that dies in flight.
_EXPIRY_MARGIN = 10.0
_DEFAULT_EXPIRES_IN = 60.0
# A token answer is a small JSON document (Docker Hub's: ~4 KiB); anything near
# this is a broken or hostile token service, and is not read further.
MAX_TOKEN_ANSWER = 256 * 1024


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    realm: str = ""
    service: str = ""
    scope: str = ""
    error: str = ""  # e.g. "insufficient_scope", "invalid_token"


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Every Bearer and Basic challenge of the ``WWW-Authenticate`` lines, in order.

    A line may hold several challenges (``Bearer realm="a", Basic realm="b"``) and a
    response several lines; each challenge keeps its own parameters.
    """
    found: list[tuple[str, dict[str, str]]] = []
    for header in headers:
        position = 0
        while position < len(header):
            match = _ITEM.match(header, position)
            if match is None or match.end() == position:
                position += 1  # a stray character; skip it
                continue
            position = match.end()
            if match.group(3) is not None:
                found.append((match.group(3).lower(), {}))
            elif found:
                value = match.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                found[-1][1].setdefault(match.group(1).lower(), value)
    return [
        Challenge(
            scheme,
            params.get("realm", ""),
            params.get("service", ""),
            params.get("scope", ""),
            params.get("error", ""),
        )
        for scheme, params in found
        if scheme in ("bearer", "basic")
    ]


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def realm_allowed(upstream: httpx.URL, realm: str, allowed: Iterable[str]) -> bool:
    """May this upstream's credentials be sent to this token realm?"""
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL:
        return False
    if url.scheme not in ("http", "https") or not url.host:
        return False
    if upstream.scheme == "https" and url.scheme != "https":
        return False
    if url.host == upstream.host:
        return True
    where = (*_origin(url), url.path)
    return any(where == (*_origin(httpx.URL(a)), httpx.URL(a).path) for a in allowed)


def _request_scope(request: httpx.Request) -> str:
    match = _REPOSITORY_PATH.match(request.url.path)
    return f"repository:{match.group(1)}:pull" if match else ""


class RegistryAuth(httpx.Auth):
    """Adds the right ``Authorization`` header to requests for one upstream.

    ``token_client`` fetches tokens; it must not itself use this auth.
    ``allowed_realms`` are token realms off the upstream's host that it may use.
    """

    def __init__(
        self,
        token_client: httpx.AsyncClient,
        upstream_url: str,
        username: str | None = None,
        password: str | None = None,
        now: Callable[[], float] = time.monotonic,
        *,
        allowed_realms: Iterable[str] = (),
        token_timeout: float = 60.0,
    ) -> None:
        self._token_client = token_client
        self._upstream = httpx.URL(upstream_url)
        self._allowed_realms = tuple(allowed_realms)
        self._token_timeout = token_timeout
        self._credentials = (username, password) if username and password else None
        self._basic_header = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
            if self._credentials
            else None
        )
        self._now = now
        self._challenge: Challenge | None = None  # the upstream's own, with an allowed realm
        self._tokens: dict[str, tuple[str, float]] = {}  # scope → (token, expires at)
        self._locks: dict[str, asyncio.Lock] = {}

    def _ours(self, url: httpx.URL) -> bool:
        return _origin(url) == _origin(self._upstream)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not self._ours(request.url):
            yield request  # never credentials for another origin
            return
        scope = _request_scope(request)
        sent = await self._authorization(scope, rejected=None)
        if sent:
            request.headers["Authorization"] = sent
        response = yield request
        # After redirects, the answer may come from blob storage: not ours to follow.
        if response.status_code != 401 or not self._ours(response.request.url):
            return
        challenge = self._choose(response)
        if challenge is None:
            return
        scope = challenge.scope or scope
        if challenge.error == "insufficient_scope" and sent is not None:
            cached = self._tokens.get(scope)
            if cached is not None and sent == f"Bearer {cached[0]}":
                return  # a fresh token for this very scope: the repository is not there for us
        self._challenge = challenge
        retry = await self._authorization(scope, rejected=sent)
        if retry is None or retry == sent:
            return
        request.headers["Authorization"] = retry
        yield request

    def _choose(self, response: httpx.Response) -> Challenge | None:
        """The challenge to answer: Bearer before Basic; refuse a realm not allowed."""
        challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        if bearer is not None:
            if not realm_allowed(self._upstream, bearer.realm, self._allowed_realms):
                log.error(
                    "upstream %s named token realm %s, which is neither on its own host "
                    "nor listed in its auth_realms; nothing was sent there",
                    self._upstream.host,
                    bearer.realm,
                )
                raise UpstreamRefused(
                    f"upstream {self._upstream.host} asks for tokens from {bearer.realm}, "
                    "a realm the mirror's configuration does not allow (auth_realms)"
                )
            return bearer
        if self._credentials and any(c.scheme == "basic" for c in challenges):
            return Challenge("basic")
        return None

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
        # The realm's own query (some registries put a tenant or client id there) stays.
        url = httpx.URL(challenge.realm).copy_merge_params(params)
        host = url.host
        try:
            async with asyncio.timeout(self._token_timeout):
                status, body = await self._read_token_answer(url)
        except TimeoutError as exc:
            raise Unavailable(f"token service {host} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise Unavailable(f"token service {host} unreachable: {type(exc).__name__}") from exc
        if status in (401, 403):
            log.error("token service %s refused the credentials configured for it", host)
            raise UpstreamRefused(
                f"token service {host} refused the mirror's own upstream credentials"
            )
        if status != 200:
            raise Unavailable(f"token service {host} answered {status}")
        try:
            document = httpx.Response(200, content=body).json()
            token = document.get("token") or document.get("access_token")
            expires_in = float(document.get("expires_in") or _DEFAULT_EXPIRES_IN)
        except (ValueError, AttributeError, TypeError) as exc:
            raise Unavailable(f"token service {host} sent an unreadable answer") from exc
        if not isinstance(token, str) or not token:
            raise Unavailable(f"token service {host} sent no token")
        return token, expires_in

    async def _read_token_answer(self, url: httpx.URL) -> tuple[int, bytes]:
        too_large = Unavailable(
            f"token service {url.host} sent an answer larger than {MAX_TOKEN_ANSWER} bytes"
        )
        async with self._token_client.stream("GET", url, auth=self._credentials) as response:
            if response.status_code != 200:
                return response.status_code, b""
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_TOKEN_ANSWER:
                raise too_large
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_TOKEN_ANSWER:
                    raise too_large
            return response.status_code, bytes(body)
