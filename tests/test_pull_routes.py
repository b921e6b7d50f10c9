"""The manifest and blob routes, found without Starlette's router
(mirror/web/pull_routes.py): the same paths as Starlette's patterns for them,
tried in the order the app had them (uploads before blobs). And the label a
request is counted under (mirror/web/access_log.py): the route that takes it."""

from __future__ import annotations

import pytest
from starlette.routing import compile_path

from mirror.web.access_log import route_of
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
    f"/v2/myorg/manifests/blobs/{DIGEST}",
    "/v2/myorg/blobs/manifests/1",
    "/v2/myorg/manifests/tags/list",
    f"/v2/myorg/blobs/referrers/{DIGEST}",
    "/v2/a/tags/list/manifests/1",
    "/v2/tags/list",
    "/v2//tags/list",
    f"/v2/referrers/{DIGEST}",
    f"/v2//referrers/{DIGEST}",
    "/v2/a/referrers/",
    "/v2/a/blobs/uploads/x/tags/list",
]
# The app's router after the pull routes, in its order, with the label of each.
_ROUTER = [
    ("blob", "/v2/{name:path}/blobs/uploads/{rest:path}"),
    ("base", "/v2/"),
    ("catalog", "/v2/_catalog"),
    ("tags", "/v2/{name:path}/tags/list"),
    ("referrers", "/v2/{name:path}/referrers/{digest}"),
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


def _label_of_route_taken(path: str) -> str:
    pull = _starlette(path)
    if pull is not None:
        return "manifest" if pull[0] == "manifests" else "blob"
    for label, pattern in _ROUTER:
        if compile_path(pattern)[0].match(path):
            return label
    return "other"


@pytest.mark.parametrize("path", [p for p in PATHS if p.startswith("/v2/")])
def test_a_request_is_counted_under_the_route_that_takes_it(path: str) -> None:
    assert route_of(path) == _label_of_route_taken(path)
