"""End to end: skopeo pulls through a real ``mirror serve`` from a real registry."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import SeededUpstream
from tests.support import skopeo
from tests.support.mirror import peak_rss_bytes

pytestmark = pytest.mark.e2e


def test_skopeo_pulls_every_manifest_kind_and_the_second_pull_stays_local(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    upstream = seeded.registry
    images = {
        "library/test:1": upstream.manifest_digest("library/test", "1"),
        "library/v2:1": upstream.manifest_digest("library/v2", "1"),
        "library/multi:1": upstream.manifest_digest("library/multi", "1"),
    }
    with seeded.mirror() as mirror:
        for ref, expected in images.items():
            out = tmp_path / ref.replace("/", "_").replace(":", "_")
            got = skopeo.copy_to_dir(mirror.ref(ref), out, all_platforms=True)
            assert got == expected
            if ref.startswith("library/multi"):
                skopeo.verify_dir(out, require_children=True)
        mark = upstream.mark()
        for ref, expected in images.items():
            out = tmp_path / ("again-" + ref.replace("/", "_").replace(":", "_"))
            assert skopeo.copy_to_dir(mirror.ref(ref), out, all_platforms=True) == expected
        assert upstream.requests_since(mark) == []


def test_large_layer_streams_with_flat_memory_and_is_then_served_from_disk(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    upstream = seeded.registry
    expected = upstream.manifest_digest("library/large", "1")
    with seeded.mirror() as mirror:
        (pid,) = mirror.pids()
        # Warm the interpreter's code paths on a small image first.
        skopeo.copy_to_dir(mirror.ref("library/test:1"), tmp_path / "small")
        before = peak_rss_bytes(pid)
        mark = upstream.mark()
        assert skopeo.copy_to_dir(mirror.ref("library/large:1"), tmp_path / "cold") == expected
        grown = peak_rss_bytes(pid) - before
        assert upstream.blob_bytes_sent(mark) == seeded.large.total_size
        assert grown < 40 * 1024 * 1024, f"RSS grew by {grown} bytes for a 256 MiB layer"
        mark = upstream.mark()
        assert skopeo.copy_to_dir(mirror.ref("library/large:1"), tmp_path / "warm") == expected
        assert upstream.blob_gets(mark) == []


def test_pull_by_digest_succeeds_after_the_upstream_is_stopped(tmp_path: Path) -> None:
    from tests.support.images import write_image
    from tests.support.mirror import MirrorProcess
    from tests.support.registry import UpstreamRegistry

    image = write_image(tmp_path / "layout", "1", [10_000, 20_000], seed=7)
    with UpstreamRegistry(auth="token") as upstream:
        upstream.push_image(image, "library/gone:1")
        mirror = MirrorProcess([{"name": "docker.io", "url": upstream.url, "retries": 0}])
        with mirror:
            skopeo.copy_to_dir(mirror.ref("library/gone:1"), tmp_path / "first")
            upstream.stop()
            by_digest = mirror.ref(f"library/gone@{image.manifest_digest}")
            assert skopeo.copy_to_dir(by_digest, tmp_path / "offline") == image.manifest_digest


def test_push_through_the_mirror_is_unsupported(seeded: SeededUpstream, tmp_path: Path) -> None:
    with seeded.mirror() as mirror:
        response = httpx.post(f"{mirror.url}/v2/library/test/blobs/uploads/")
        assert response.status_code == 405
        assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
        with pytest.raises(skopeo.SkopeoError):
            skopeo.copy(seeded.single.ref, mirror.ref("library/pushed:1"))


def test_wrong_bytes_from_the_upstream_reach_neither_cache_nor_client(tmp_path: Path) -> None:
    from tests.support.images import write_image
    from tests.support.mirror import MirrorProcess
    from tests.support.registry import UpstreamRegistry

    image = write_image(tmp_path / "layout", "1", [200_000], seed=8)
    layer = image.layers[0].digest
    with UpstreamRegistry(auth="none") as upstream:
        upstream.push_image(image, "library/bad:1")
        algorithm, hex_ = layer.split(":")
        data = upstream.storage_dir / f"docker/registry/v2/blobs/{algorithm}/{hex_[:2]}/{hex_}/data"
        original = data.read_bytes()
        data.write_bytes(bytes(reversed(original)))
        mirror = MirrorProcess([{"name": "docker.io", "url": upstream.url, "retries": 0}])
        with mirror:
            with pytest.raises(skopeo.SkopeoError):
                skopeo.copy_to_dir(mirror.ref("library/bad:1"), tmp_path / "out")
            assert not list((mirror.cache_dir / "blobs").glob(f"**/{hex_}*"))
            assert "digest mismatch" in mirror.log()
            data.write_bytes(original)
            got = skopeo.copy_to_dir(mirror.ref("library/bad:1"), tmp_path / "fixed")
            assert got == image.manifest_digest
