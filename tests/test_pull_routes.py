"""The manifest and blob routes, found without Starlette's router
(mirror/web/pull_routes.py): the same paths as Starlette's patterns for them,
tried in the order the app had them (uploads before blobs)."""

from __future__ import annotations

import pytest
from starlette.routing import compile_path

from mirror.web.pull_routes import pull_route

DIGEST = "sha256:" + "a" * 64
_PATTERNS = [  # what the app routed by Starlette before, in its order
    ("manifests", "/v2/{name:path}/manifests/{reference}"),
    ("uploads", "/v2/{name:path}/blobs/uploads/{rest:path}"),
    ("blobs", "/v2/{name:path}/blobs/{digest}"),
]
PATHS = [
    "/v2/library/alpine/manifests/3",
    f"/v2/library/alpine/manifests/{DIGEST}",
    f"/v2/a/b/c/blobs/{DIGEST}",
    "/v2/alpine/manifests/",
    "/v2/alpine/blobs/",
    "/v2//manifests/latest",
    f"/v2//blobs/{DIGEST}",
    "/v2/manifests/latest",
    f"/v2/blobs/{DIGEST}",
    "/v2/a/manifests/b/manifests/c",
    "/v2/a/blobs/b/manifests/c",
    "/v2/a/manifests/b/blobs/c",
    "/v2/a/blobs/uploads/",
    "/v2/a/blobs/uploads",
    "/v2/a/blobs/uploads/x",
    f"/v2/a/blobs/uploads/x/blobs/{DIGEST}",
    "/v2/a/blobs/uploads/x/manifests/y",
    "/v2//blobs/uploads/x",
    "/v2/blobs/uploads/x",
    "/v2/a/tags/list",
    f"/v2/a/referrers/{DIGEST}",
    "/v2/_catalog",
    "/v2/",
    "/v2",
    "/v3/a/manifests/b",
    "/metrics",
    "/v2/a%2Fb/manifests/c",
    "/v2/a/manifests/b%2Fc",
    "/v2/a b/manifests/c d",
]


def _starlette(path: str) -> tuple[str, dict[str, str]] | None:
    for kind, pattern in _PATTERNS:
        match = compile_path(pattern)[0].match(path)
        if match:
            return (kind, match.groupdict()) if kind != "uploads" else None
    return None


@pytest.mark.parametrize("path", PATHS)
def test_a_path_goes_where_starlette_sent_it(path: str) -> None:
    assert pull_route(path) == _starlette(path)


def test_a_name_with_a_line_break_reaches_the_route_to_be_refused_there() -> None:
    assert _starlette("/v2/a\nb/manifests/c") is None
    assert pull_route("/v2/a\nb/manifests/c") == ("manifests", {"name": "a\nb", "reference": "c"})
