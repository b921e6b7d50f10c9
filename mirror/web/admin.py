"""The admin API (``/admin/…``, JSON) and the status page (``/ui``), on the main listener.

Who may use them: with ``[auth]``, users listed in ``auth.admins`` (Basic
credentials or a token; anonymous never). Without ``[auth]``, only clients on this
host (a loopback address): the port a LAN mirror exposes lets nobody else purge.
A reverse proxy on the same host makes every client look local: enable ``[auth]``
behind one.

Routes (see README, "Admin API"):
    GET    /admin/status                    figures for the status page
    GET    /admin/repositories?upstream=&prefix=&last=&n=
    GET    /admin/tags?repository=NAME
    GET    /admin/blobs?last=&n=
    GET    /admin/image?ref=REF
    POST   /admin/purge    {"kind": "tag|repository|upstream|digest|age", "ref"|"age": …}
    GET    /admin/pins;  POST /admin/pins {"ref": REF};  DELETE /admin/pins?ref=REF
    POST   /admin/verify   {"rate": "50MiB"};  GET /admin/verify (the last run's progress)
    POST   /admin/refresh  {"ref": REF}: ask the upstream what the tag is now
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..admin.integrity import Progress
from ..admin.operations import Admin, progress_json
from ..config import ConfigError, Settings, parse_size
from ..errors import Denied, RequestInvalid, Unauthorized
from .auth import Gate

__all__ = ["AdminRoutes"]

log = logging.getLogger("mirror.admin")

Endpoint = Callable[[Request], Awaitable[Response]]
_MAX_BODY = 64 * 1024
_DEFAULT_VERIFY_RATE = 50 * 1024 * 1024  # bytes a second: a background job, not a flood


class AdminRoutes:
    def __init__(self, admin: Admin, gate: Gate, settings: Settings) -> None:
        self.admin = admin
        self.gate = gate
        self.admins = set(settings.auth.admins)
        self.verifying: Progress | None = None
        self._task: asyncio.Task[Any] | None = None

    def routes(self) -> list[Route]:
        guard = self._admin_only
        return [
            Route("/ui", guard(self.page)),
            Route("/admin/status", guard(self.status)),
            Route("/admin/repositories", guard(self.repositories)),
            Route("/admin/tags", guard(self.tags)),
            Route("/admin/blobs", guard(self.blobs)),
            Route("/admin/image", guard(self.image)),
            Route("/admin/purge", guard(self.purge), methods=["POST"]),
            Route("/admin/pins", guard(self.pins), methods=["GET", "POST", "DELETE"]),
            Route("/admin/verify", guard(self.verify), methods=["GET", "POST"]),
            Route("/admin/refresh", guard(self.refresh), methods=["POST"]),
        ]

    async def aclose(self) -> None:
        if self.verifying is not None:
            self.verifying.stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # who may

    def _admin_only(self, endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            request.state.user = await self._who(request)
            return await endpoint(request)

        return guarded

    async def _who(self, request: Request) -> str:
        if not self.gate.enabled:
            host = request.client.host if request.client else ""
            try:
                local = ipaddress.ip_address(host).is_loopback
            except ValueError:
                local = False
            if not local:
                raise Denied("without [auth], the admin API answers only clients on this host")
            return f"local:{host}"
        principal = await self.gate.authenticate(request)
        if principal.user is None:
            self.gate.metrics.auth_denials.labels("unauthenticated").inc()
            # Basic, also with tokens on: a browser can answer it for the status page.
            challenge = {"WWW-Authenticate": f'Basic realm="{self.gate.settings.realm}"'}
            raise Unauthorized("authentication required", headers=challenge)
        if principal.user not in self.admins:
            self.gate.metrics.auth_denials.labels("forbidden").inc()
            log.warning("denied %s the admin API (%s)", principal.user, request.url.path)
            raise Denied(f"{principal.user} is not an admin (auth.admins)")
        return principal.user

    # routes

    async def _run(self, function: Callable[..., Any], *args: Any) -> JSONResponse:
        return JSONResponse(await anyio.to_thread.run_sync(function, *args))

    async def page(self, request: Request) -> Response:
        html = resources.files("mirror.web").joinpath("status.html").read_text()
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def status(self, request: Request) -> Response:
        body = await anyio.to_thread.run_sync(self.admin.status)
        if self.admin.fleet is not None:  # replicas: the bucket's figures, the fleet's pins
            body.update(await self.admin.fleet.status())
        return JSONResponse(body)

    async def repositories(self, request: Request) -> Response:
        q = request.query_params
        return await self._run(
            self.admin.repositories, q.get("upstream"), q.get("prefix", ""), q.get("last"), _n(q)
        )

    async def tags(self, request: Request) -> Response:
        return await self._run(self.admin.tags, _required(request, "repository"))

    async def blobs(self, request: Request) -> Response:
        return await self._run(
            self.admin.blobs, request.query_params.get("last"), _n(request.query_params)
        )

    async def image(self, request: Request) -> Response:
        return await self._run(self.admin.image, _required(request, "ref"))

    async def purge(self, request: Request) -> Response:
        body = await _json(request)
        return await self._run(self.admin.purge, request.state.user, body)

    async def pins(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(await self.admin.pins())
        if request.method == "DELETE":
            ref = _required(request, "ref")
            return JSONResponse(await self.admin.unpin(request.state.user, ref))
        body = await _json(request)
        return JSONResponse(await self.admin.pin(request.state.user, str(body.get("ref", ""))))

    async def refresh(self, request: Request) -> Response:
        body = await _json(request)
        return JSONResponse(await self.admin.refresh(request.state.user, str(body.get("ref", ""))))

    async def verify(self, request: Request) -> Response:
        """POST starts a run in the background (one at a time); GET reads its progress."""
        if request.method == "POST":
            self.admin.refuse_on_replicas("verify")
            body = await _json(request)
            try:
                rate = parse_size(body.get("rate", _DEFAULT_VERIFY_RATE), "rate")
            except ConfigError as exc:
                raise RequestInvalid(str(exc)) from None
            if self.verifying is None or self.verifying.done:
                progress = self.verifying = Progress()
                who = request.state.user
                self._task = asyncio.ensure_future(
                    anyio.to_thread.run_sync(self.admin.verify, who, progress, rate or None)
                )
                self._task.add_done_callback(_log_failure)
                return JSONResponse(progress_json(progress), status_code=202)
        if self.verifying is None:
            return JSONResponse({"done": None})
        return JSONResponse(progress_json(self.verifying))


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("verify failed", exc_info=task.exception())


def _n(query: Any) -> int:
    raw = query.get("n", "100")
    if not raw.isdigit():
        raise RequestInvalid(f"n must be a positive integer, got {raw[:20]!r}")
    return int(raw)


def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise RequestInvalid(f"the query parameter {name!r} is required")
    return value


async def _json(request: Request) -> dict[str, Any]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY:
            raise RequestInvalid("request body too large")
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise RequestInvalid("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise RequestInvalid("the request body is not a JSON object")
    return value
