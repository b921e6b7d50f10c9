"""The web side of client authentication: who sent a request, whether it may have
what it asks for, and the ``/token`` endpoint.

The decisions are made by ``security/`` (users, tokens); this module reads
``Authorization`` headers, answers with the challenges clients understand, and
keeps the failed-login throttle per client address. With ``[auth]`` off it is a
no-op, so a LAN mirror pays nothing for it.

- Basic: ``WWW-Authenticate: Basic realm="…"``, what ``docker login`` and
  distribution's htpasswd auth use.
- Bearer (``auth.tokens``): the challenge names this mirror's ``/token``, which
  answers distribution's token API (GET with Basic credentials, ``offline_token``)
  and OAuth2 (POST ``grant_type=password|refresh_token``). Basic credentials are
  still accepted on every route.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..config import ConfigError, Settings
from ..errors import (
    Denied,
    OCIError,
    TooManyRequests,
    Unauthorized,
    Unsupported,
    retry_after,
)
from ..metrics import Metrics
from ..security.limits import Buckets, Budget, Client, ClientLimits, current_client
from ..security.rules import Authorizer
from ..security.tokens import TokenError, TokenIssuer, load_or_create_key
from ..security.users import Users
from ..upstream.client import Upstream

__all__ = ["Gate", "Principal"]

log = logging.getLogger("mirror.security")

Endpoint = Callable[[Request], Awaitable[Response]]
# What a route asks of its client: "base" is /v2/ (credentials, or an anonymous
# token), "registry" any other /v2/ route, "user" a logged-in user (/metrics),
# "token" nothing but its request budget (/token checks credentials itself).
Need = Literal["base", "registry", "user", "token"]
_MAX_FORM = 64 * 1024


@dataclass(frozen=True)
class Principal:
    user: str | None  # None: anonymous
    credentials: Literal["none", "basic", "token"]

    def __str__(self) -> str:
        return self.user if self.user is not None else "anonymous"


ANONYMOUS = Principal(None, "none")


class Gate:
    """Authenticates requests and guards routes; does nothing while auth is off."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        now: Callable[[], float] | None = None,
    ) -> None:
        auth = settings.auth
        self.settings = auth
        self.metrics = metrics
        self.enabled = auth.htpasswd is not None
        wall = now or time.time
        # Durations (throttle, remembered logins) follow the injected clock in tests.
        monotonic = now or time.monotonic
        self.users: Users | None = None
        self.tokens: TokenIssuer | None = None
        if auth.htpasswd is not None:
            try:
                self.users = Users(auth.htpasswd, now=monotonic)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError("auth.htpasswd", f"cannot read {auth.htpasswd}: {exc}") from exc
        if self.enabled and auth.tokens:
            directory = settings.cache.directory / "auth"
            try:
                key = auth.token_key.encode() if auth.token_key else load_or_create_key(directory)
                self.tokens = TokenIssuer(
                    key,
                    service=auth.service,
                    ttl=auth.token_ttl,
                    refresh_ttl=auth.refresh_token_ttl,
                    now=wall,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError("auth.tokens", f"no usable key in {directory}: {exc}") from exc
        self._now = wall
        self.rules = Authorizer(auth.anonymous, auth.rules, auth.groups)
        limits = settings.limits
        self.limits = ClientLimits(
            Budget(limits.requests_rate, limits.requests_burst) if limits.requests_rate else None,
            Budget(limits.upstream_rate, limits.upstream_burst) if limits.upstream_rate else None,
            per_address=limits.per_address,
            per_user=limits.per_user,
            now=monotonic,
        )
        # N failures at once, then one more per window / N.
        self.throttle = Buckets(
            auth.failed_logins / auth.failed_login_window, auth.failed_logins, now=monotonic
        )

    # what a principal may read

    @property
    def anonymous_reads_anything(self) -> bool:
        return self.rules.anonymous_reads_anything

    def may_read(self, principal: Principal, upstream: str, repository: str) -> bool:
        return not self.enabled or self.rules.may_read(principal.user, upstream, repository)

    def catalog_filter(
        self, request: Request, route: Callable[[str], tuple[Upstream, str]]
    ) -> Callable[[str], bool] | None:
        """Which catalog names the client may see (None: all of them)."""
        if not self.enabled:
            return None
        principal: Principal = getattr(request.state, "principal", ANONYMOUS)

        def visible(name: str) -> bool:
            try:
                upstream, repository = route(name)
            except OCIError:
                return False  # a name no route leads to is nobody's to see
            return self.may_read(principal, upstream.name, repository)

        return visible

    # guarding routes

    def guard(self, endpoint: Endpoint, need: Need = "registry") -> Endpoint:
        """The endpoint, run only for a client that passes the gate and has budget left."""
        if not self.enabled and not self.limits.enabled:
            return endpoint

        async def guarded(request: Request) -> Response:
            principal = ANONYMOUS
            if self.enabled and need != "token":
                principal = await self.authenticate(request)
                request.state.user = principal.user
                request.state.principal = principal
                self._require(request, principal, need)
            client = Client(_address(request), principal.user)
            if need != "user":
                wait = self.limits.request(client)
                if wait:
                    self.metrics.rate_limited.labels("requests").inc()
                    raise TooManyRequests(
                        "this client's request budget is spent; retry later",
                        headers={"Retry-After": retry_after(wait)},
                    )
            reset = current_client.set(client)
            try:
                return await endpoint(request)
            finally:
                current_client.reset(reset)

        return guarded

    def _require(self, request: Request, principal: Principal, need: Need) -> None:
        if principal.user is not None:
            return
        if (
            need == "user"
            or (need == "base" and principal.credentials == "none")
            or not self.anonymous_reads_anything
        ):
            self.metrics.auth_denials.labels("unauthenticated").inc()
            raise Unauthorized("authentication required", headers=self.challenge(request))

    def charge_upstream(self) -> None:
        """The service's hook before it goes upstream for a client: spend the client's
        upstream budget, so one client's cold pulls cannot use up the upstream's pull
        limit for everyone. Warming and other work of no client's is not charged."""
        client = current_client.get()
        if client is None:
            return
        wait = self.limits.upstream(client)
        if wait:
            self.metrics.rate_limited.labels("upstream").inc()
            raise TooManyRequests(
                "this client's budget of upstream requests (cache misses) is spent; retry later",
                headers={"Retry-After": retry_after(wait)},
            )

    def authorize(self, request: Request, upstream: str, repository: str) -> None:
        """Refuse a repository the client may not read: 401 (with a challenge) to an
        anonymous client, 403 to a user."""
        if not self.enabled:
            return
        principal: Principal = getattr(request.state, "principal", ANONYMOUS)
        if self.may_read(principal, upstream, repository):
            return
        self.metrics.auth_denials.labels(
            "unauthenticated" if principal.user is None else "forbidden"
        ).inc()
        if principal.user is None:
            raise Unauthorized(
                f"authentication required to pull {upstream}/{repository}",
                headers=self.challenge(request),
            )
        log.warning("denied %s pull of %s/%s", principal, upstream, repository)
        raise Denied(f"{principal} may not pull {upstream}/{repository}")

    def challenge(self, request: Request, error: str | None = None) -> dict[str, str]:
        if self.tokens is None:
            return {"WWW-Authenticate": f'Basic realm="{self.settings.realm}"'}
        parts = [f'realm="{self._token_url(request)}"', f'service="{self.settings.service}"']
        name = request.path_params.get("name")
        if name:
            parts.append(f'scope="repository:{name}:pull"')
        if error:
            parts.append(f'error="{error}"')
        return {"WWW-Authenticate": "Bearer " + ",".join(parts)}

    def _token_url(self, request: Request) -> str:
        if self.settings.token_realm:
            return self.settings.token_realm
        url = f"{str(request.base_url).rstrip('/')}/token"
        return "".join(c for c in url if c.isprintable() and c not in '"\\')

    # authentication

    async def authenticate(self, request: Request) -> Principal:
        """Who sent the request. Bad credentials are refused, never taken as anonymous."""
        header = request.headers.get("authorization")
        if not header:
            return ANONYMOUS
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            user, password = self._basic(request, value.strip())
            if not user and not password:
                return ANONYMOUS  # podman and skopeo send empty credentials when they have none
            await self._login(request, user, password)
            return Principal(user, "basic")
        if scheme == "bearer" and self.tokens is not None:
            return self._bearer(request, value.strip())
        self.metrics.auth_denials.labels("bad_credentials").inc()
        raise Unauthorized("unsupported authorization scheme", headers=self.challenge(request))

    def _basic(self, request: Request, value: str) -> tuple[str, str]:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        user, sep, password = decoded.partition(":")
        if not sep:
            self.metrics.auth_denials.labels("bad_credentials").inc()
            raise Unauthorized("malformed Basic credentials", headers=self.challenge(request))
        return user, password

    async def _login(self, request: Request, user: str, password: str) -> bytes:
        """Check a password (throttled per address); the user's hash when good."""
        assert self.users is not None
        if not self.users.remembered(user, password):
            address = _address(request)
            wait = self.throttle.wait(address)
            if wait:
                self.metrics.auth_denials.labels("throttled").inc()
                raise TooManyRequests(
                    "too many failed logins from this address; retry later",
                    headers={"Retry-After": retry_after(wait)},
                )
            if not await self.users.check(user, password):
                self.throttle.take(address)
                self.metrics.auth_denials.labels("bad_credentials").inc()
                log.warning("failed login from %s", address)
                raise Unauthorized("invalid username or password", headers=self.challenge(request))
        hashed = self.users.hashed(user)
        if hashed is None:  # removed while we checked
            raise Unauthorized("invalid username or password", headers=self.challenge(request))
        return hashed

    def _bearer(self, request: Request, token: str) -> Principal:
        assert self.tokens is not None and self.users is not None
        try:
            claims = self.tokens.verify(token)
            if claims.user is not None:
                current = self.tokens.fingerprint(self.users.hashed(claims.user))
                if not current or current != claims.fingerprint:
                    raise TokenError("the token's user or password changed")
        except TokenError as exc:
            self.metrics.auth_denials.labels("bad_token").inc()
            log.info("refused a bearer token from %s: %s", _address(request), exc)
            raise Unauthorized(
                "invalid or expired token", headers=self.challenge(request, "invalid_token")
            ) from None
        return Principal(claims.user, "token")

    # /token

    async def token_endpoint(self, request: Request) -> Response:
        """Distribution's token API (GET) and its OAuth2 variant (POST)."""
        assert self.tokens is not None and self.users is not None
        offline = False
        user: str | None = None
        hashed: bytes | None = None
        if request.method == "GET":
            offline = request.query_params.get("offline_token", "").lower() == "true"
            principal = await self.authenticate(request)
            if principal.credentials == "token":
                raise Unsupported("present a password or a refresh token, not an access token")
            user = principal.user
            if user is not None:
                hashed = self.users.hashed(user)
        elif request.method == "POST":
            form = await _form(request)
            grant = form.get("grant_type", "")
            offline = form.get("access_type", "") == "offline"
            if grant == "password":
                user = form.get("username", "")
                hashed = await self._login(request, user, form.get("password", ""))
            elif grant == "refresh_token":
                user, hashed = self._refresh(request, form.get("refresh_token", ""))
                offline = False  # the client keeps the refresh token it has
            else:
                raise Unsupported(f"grant_type {grant[:40]!r} is not supported")
        else:
            raise Unsupported(f"{request.method} is not supported on /token")
        if user is None and not self.anonymous_reads_anything:
            self.metrics.auth_denials.labels("unauthenticated").inc()
            raise Unauthorized(
                "authentication required",
                headers={"WWW-Authenticate": f'Basic realm="{self.settings.realm}"'},
            )
        token = self.tokens.issue(user, hashed)
        body: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": int(self.tokens.ttl),
            "issued_at": datetime.fromtimestamp(self._now(), UTC).isoformat(),
        }
        if offline and user is not None:
            body["refresh_token"] = self.tokens.issue(user, hashed, "refresh")
        request.state.user = user
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def _refresh(self, request: Request, token: str) -> tuple[str, bytes]:
        assert self.tokens is not None and self.users is not None
        try:
            claims = self.tokens.verify(token, "refresh")
            hashed = self.users.hashed(claims.user) if claims.user else None
            if hashed is None or self.tokens.fingerprint(hashed) != claims.fingerprint:
                raise TokenError("the token's user or password changed")
        except TokenError as exc:
            self.metrics.auth_denials.labels("bad_token").inc()
            log.info("refused a refresh token from %s: %s", _address(request), exc)
            # RFC 9110: a 401 always says how to authenticate; here, with a password.
            raise Unauthorized(
                "invalid or expired refresh token",
                headers={"WWW-Authenticate": f'Basic realm="{self.settings.realm}"'},
            ) from None
        assert claims.user is not None
        return claims.user, hashed


def _address(request: Request) -> str:
    return request.client.host if request.client else "-"


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form, small (no multipart parser needed for OAuth2's)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise Unsupported("form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}
