"""The two routes every pull hits, dispatched ahead of Starlette's router.

A pull is a manifest and its blobs: ``/v2/<name>/manifests/<reference>`` and
``/v2/<name>/blobs/<digest>``. Starlette's router tries a regular expression per
route and wraps the one that matches in exception handlers and send wrappers of
its own: 12% of a warm request's instructions. One split of the path finds these
two. It takes exactly the paths Starlette's patterns for them took (``<name>``
may hold slashes or be empty, the last segment may not), except that a name with
a line break, which those patterns refused, reaches the route to be refused there
as an invalid name. A blob path that is an upload path too (``…/blobs/uploads/…``)
goes on to the router, which tries uploads first, like every other path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import OCIError

__all__ = ["PullRoutes", "pull_route"]

Endpoint = Callable[[Request], Awaitable[Response]]
RenderError = Callable[[OCIError, str], Response]

# The kind of path, and the name its last segment takes among the path parameters.
_LAST = {"manifests": "reference", "blobs": "digest"}


def pull_route(path: str) -> tuple[str, dict[str, str]] | None:
    """The kind (``manifests`` or ``blobs``) and path parameters of a pull's path;
    None for any other path."""
    if not path.startswith("/v2/"):
        return None
    rest, _, last = path[4:].rpartition("/")
    name, slash, kind = rest.rpartition("/")
    if not slash or not last or kind not in _LAST:
        return None
    if kind == "blobs" and "/blobs/uploads/" in path[4:]:
        return None
    return kind, {"name": name, _LAST[kind]: last}


class PullRoutes:
    """Sends manifest and blob requests to their endpoints, every other request on
    to ``app``; an ``OCIError`` from an endpoint becomes its error answer, as the
    app's exception handler makes it for the other routes."""

    def __init__(
        self, app: ASGIApp, manifest: Endpoint, blob: Endpoint, render_error: RenderError
    ) -> None:
        self.app = app
        self._endpoints = {"manifests": manifest, "blobs": blob}
        self._render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = pull_route(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        kind, scope["path_params"] = route
        request = Request(scope, receive)
        try:
            response = await self._endpoints[kind](request)
        except OCIError as exc:
            response = self._render_error(exc, request.method)
        await response(scope, receive, send)
