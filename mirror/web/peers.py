"""The internal route replicas stream blobs from one another by (``replicas/peers.py``).

It answers only requests signed with the replicas' shared secret, and only with what
this replica holds or is filling: it never goes upstream and checks no repository,
so it must never answer anyone else.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..errors import OCIError
from ..fills.blobs import Blob
from ..reference import Digest, parse_digest
from ..replicas.peers import PEER_PATH, verify_peer
from ..service import PullThroughCache

__all__ = ["peer_routes"]

Respond = Callable[[Blob, Digest, str | None], Response]


def peer_routes(
    cache: PullThroughCache, secret: str, respond: Respond, now: Callable[[], float] = time.time
) -> list[Route]:
    async def blob(request: Request) -> Response:
        try:
            digest = parse_digest(request.path_params["digest"])
        except OCIError:
            return PlainTextResponse("not a digest\n", 404)
        if not verify_peer(secret, digest, request.headers.get("authorization"), now()):
            return PlainTextResponse("forbidden\n", 403)
        found = await cache.peer_blob(digest)
        if found is None:
            return PlainTextResponse("not here\n", 404)
        return respond(found, digest, request.headers.get("range"))

    return [Route(PEER_PATH + "{digest}", blob, methods=["GET"])]
