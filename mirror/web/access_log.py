"""Per-request observation: one access-log line and the request metrics.

Routes leave what they learnt (the cache result, the upstream) in the request's
state; the web layer's envelope (``app._Exchange``) hands each exchange here once
its answer is done.
"""

from __future__ import annotations

import logging

from starlette.types import Scope

from ..logs import ACCESS_LOG
from ..metrics import Metrics
from .pull_routes import pull_route

__all__ = ["AccessLog", "route_of"]

log = logging.getLogger(ACCESS_LOG)

# Results whose bytes did not come from an upstream for this request.
_FROM_CACHE = {"hit", "coalesced", "revalidated", "stale"}


def route_of(path: str) -> str:
    """A bounded label for a request path: the route that takes it.

    Found as the routes are tried (``pull_route``, then the router's order), not by
    what the path contains: ``myorg/manifests`` is a repository name, and a blob of
    it is counted as a blob."""
    if path in ("/v2/", "/v2"):
        return "base"
    if path.startswith("/v2/"):
        pull = pull_route(path)
        if pull is not None:
            return "manifest" if pull[0] == "manifests" else "blob"
        if "/blobs/uploads/" in path[4:]:  # a push, refused: the blob API's other half
            return "blob"
        if path == "/v2/_catalog":
            return "catalog"
        if path.endswith("/tags/list") and len(path) >= len("/v2//tags/list"):
            return "tags"
        head, _, digest = path.rpartition("/")
        if digest and head.endswith("/referrers") and len(head) >= len("/v2//referrers"):
            return "referrers"
        return "other"
    if path in ("/metrics", "/healthz", "/readyz"):
        return path[1:]
    return "other"


class AccessLog:
    """What is kept of each exchange: the request metrics, and a line at ``info``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def record(self, scope: Scope, status: int, sent: int, seconds: float) -> None:
        route = route_of(scope["path"])
        method = scope["method"]
        state = scope.get("state") or {}
        result = state.get("cache_result", "-")
        upstream = state.get("upstream", "-")
        user = state.get("user") or "-"
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        if sent and result != "-":
            source = "cache" if result in _FROM_CACHE else "upstream"
            self.metrics.sent_bytes.labels(source).inc(sent)
        if not log.isEnabledFor(logging.INFO):
            return  # the line is not written: building it was a cost per request
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        client = scope.get("client")
        remote = client[0] if client else "-"
        fields = {
            "remote": remote,
            "method": method,
            "path": target,
            "status": status,
            "bytes": sent,
            "duration_seconds": round(seconds, 6),
            "cache": result,
            "upstream": upstream,
            "user": user,
        }
        log.info(
            '%s "%s %s" %d %dB %.3fs cache=%s upstream=%s user=%s',
            remote,
            method,
            target,
            status,
            sent,
            seconds,
            result,
            upstream,
            user,
            extra={"access": fields},
        )
