"""End to end: the cache's promises with real processes, a real upstream and skopeo."""

from __future__ import annotations

import concurrent.futures
import hashlib
from pathlib import Path

import httpx
import pytest

from tests.conftest import SeededUpstream
from tests.support import skopeo

pytestmark = pytest.mark.e2e


def _sha256_of_stream(url: str) -> str:
    hasher = hashlib.sha256()
    with httpx.stream("GET", url, timeout=120) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _cached_blobs_verify(cache_dir: Path) -> int:
    """Every blob file in the cache hashes to the digest in its name; returns the count."""
    files = [p for p in (cache_dir / "blobs").glob("sha256/*/*") if p.is_file()]
    for path in files:
        with path.open("rb") as file:
            assert hashlib.file_digest(file, "sha256").hexdigest() == path.name.split(".")[0]
    return len(files)


def test_concurrent_pulls_across_two_workers_fetch_each_blob_once(seeded: SeededUpstream) -> None:
    upstream = seeded.registry
    layer = seeded.large.layers[0].digest
    with seeded.mirror(workers=2) as mirror:
        assert len(mirror.pids()) >= 3  # the supervisor and two workers
        mark = upstream.mark()
        url = f"{mirror.url}/v2/library/large/blobs/{layer}"
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            digests = list(pool.map(_sha256_of_stream, [url] * 16))
        assert digests == [layer] * 16
        assert [e.status for e in upstream.blob_gets(mark) if e.status != 401] == [200]
        assert upstream.blob_bytes_sent(mark) == seeded.large.layers[0].size


def test_concurrent_skopeo_pulls_take_the_image_from_upstream_once(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    upstream = seeded.registry
    expected = upstream.manifest_digest("library/large", "1")
    with seeded.mirror() as mirror:
        mark = upstream.mark()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outs = [tmp_path / f"out{i}" for i in range(4)]
            pulled = list(
                pool.map(lambda out: skopeo.copy_to_dir(mirror.ref("library/large:1"), out), outs)
            )
        assert pulled == [expected] * 4
        assert upstream.blob_bytes_sent(mark) == seeded.large.total_size


def test_kill_9_mid_fill_leaves_no_partial_entry_and_pulls_succeed_after_restart(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    layer = seeded.large.layers[0].digest
    mirror = seeded.mirror(cache_dir=cache_dir)
    with mirror:
        with httpx.stream("GET", f"{mirror.url}/v2/library/large/blobs/{layer}") as response:
            next(response.iter_bytes(1 << 20))
            assert list((cache_dir / "tmp").iterdir())  # the fill is under way
            mirror.stop(kill=True)
        mirror.start()
        assert list((cache_dir / "tmp").iterdir()) == []  # leftovers cleaned at start
        _cached_blobs_verify(cache_dir)
        expected = seeded.registry.manifest_digest("library/large", "1")
        assert skopeo.copy_to_dir(mirror.ref("library/large:1"), tmp_path / "out") == expected
        mirror.wait_fills_settled()
        assert _cached_blobs_verify(cache_dir) == 2  # the config and the layer


def test_a_full_disk_passes_content_through_and_logs_it_once(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "tiny"
    cache_dir.mkdir()
    mirror = seeded.mirror(cache_dir=cache_dir)
    # The mirror gets a mount namespace of its own with a 32 MiB cache disk.
    mirror.wrapper = (
        "unshare",
        "--mount",
        "sh",
        "-c",
        f'mount -t tmpfs -o size=32m tmpfs "{cache_dir}" && exec "$0" "$@"',
    )
    with mirror:
        expected = seeded.registry.manifest_digest("library/large", "1")
        for attempt in range(2):
            out = tmp_path / f"out{attempt}"
            assert skopeo.copy_to_dir(mirror.ref("library/large:1"), out) == expected
        assert mirror.log().count("cache disk is full") == 1
        assert mirror.process is not None and mirror.process.poll() is None
