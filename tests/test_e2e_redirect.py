"""End to end: with ``storage.redirect`` a replica answers a GET of a blob in the bucket
with a 307 to a presigned URL, and skopeo pulls the image from SeaweedFS, verified;
HEAD and Range requests are still answered by the replica."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from mirror.reference import parse_digest
from mirror.storage.s3 import S3Objects
from tests.conftest import SeededUpstream
from tests.support import skopeo
from tests.support.redis import RedisServer
from tests.support.seaweed import S3Endpoint

pytestmark = pytest.mark.e2e


async def _put_blobs(s3: S3Endpoint, prefix: str, layout: Path, digests: list[str]) -> None:
    """The blobs as a replica's verified fill leaves them in the bucket."""
    settings = s3.settings(prefix)
    async with S3Objects(settings) as objects:
        for digest in digests:
            parsed = parse_digest(digest)
            assert await objects.put_file(parsed, layout / "blobs" / "sha256" / parsed.hex)


def test_skopeo_pulls_blobs_from_the_bucket_through_redirects(
    seeded: SeededUpstream, seaweed: S3Endpoint, redis_server: RedisServer, tmp_path: Path
) -> None:
    image = seeded.single
    prefix = f"test-{uuid.uuid4().hex}/"
    asyncio.run(_put_blobs(seaweed, prefix, image.layout_dir, image.blob_digests))
    storage = "\n".join(
        [
            "[storage]",
            'backend = "s3"',
            f'endpoint = "{seaweed.url}"',
            f'bucket = "{seaweed.bucket}"',
            f'prefix = "{prefix}"',
            'advertise_url = "http://127.0.0.1:1"',
            "redirect = true",
            'redirect_ttl = "5m"',
        ]
    )
    env = {
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "MIRROR_REDIS_URL": redis_server.url,
        "MIRROR_PEER_SECRET": "s" * 32,
    }
    upstream = seeded.registry
    with seeded.mirror(extra_toml=storage, env=env, workdir=tmp_path / "mirror") as mirror:
        mark = upstream.mark()
        pulled = skopeo.copy_to_dir(mirror.ref("library/test:1"), tmp_path / "pulled")
        assert pulled == image.manifest_digest
        assert upstream.blob_gets(mark) == []  # every blob came from the bucket

        layer = image.layer_digests[-1]
        url = f"{mirror.url}/v2/library/test/blobs/{layer}"
        with httpx.Client() as http:
            redirected = http.get(url)
            assert redirected.status_code == 307
            assert redirected.headers["Location"].startswith(seaweed.url)
            head = http.head(url)
            assert head.status_code == 200
            assert head.headers["Content-Length"] == str(image.layers[-1].size)
            ranged = http.get(url, headers={"Range": "bytes=0-9"})
            assert ranged.status_code == 206
            assert len(ranged.content) == 10
            # Under a repository not known to hold it: refused, no URL given away.
            other = http.get(f"{mirror.url}/v2/library/v2/blobs/{layer}")
            assert other.status_code == 404
            assert "Location" not in other.headers
        metrics = httpx.get(f"{mirror.url}/metrics").text
        assert 'mirror_cache_requests_total{kind="blob",result="redirect"}' in metrics
