"""Two workers killed with -9 at random moments of a burst of fills: afterwards every
cached file hashes to its digest, the index and the files agree, and no response that
looked complete was wrong."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from mirror.storage.disk import ORPHAN_GRACE_SECONDS
from tests.fakes import FakeRegistry
from tests.support.mirror import MirrorProcess
from tests.support.ports import wait_http_ok
from tests.support.quirky import QuirkyUpstream

pytestmark = pytest.mark.e2e

ROUNDS = 2


@pytest.fixture
def upstream() -> Iterator[QuirkyUpstream]:
    with QuirkyUpstream(FakeRegistry(), piece_delay=0.002) as quirky:
        yield quirky


def _pull(url: str) -> tuple[str, str]:
    hasher = hashlib.sha256()
    try:
        with httpx.stream("GET", url, timeout=60) as response:
            if response.status_code != 200:
                return f"status {response.status_code}", response.read().decode()[:300]
            for chunk in response.iter_bytes():
                hasher.update(chunk)
    except httpx.HTTPError:
        return "aborted", ""
    return "ok", "sha256:" + hasher.hexdigest()


def _index(cache: Path) -> dict[str, str]:
    """Blob digests by the file the index names for them."""
    with closing(sqlite3.connect(cache / "cache.db", timeout=30)) as db:
        rows = db.execute("SELECT key, filename FROM Cache WHERE key LIKE 'blob:%'").fetchall()
    return {str(filename): str(key).removeprefix("blob:") for key, filename in rows}


def _blob_files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in (cache / "blobs").glob("*/*/*") if p.is_file()}


def _kill_workers_at_random_moments(mirror: MirrorProcess, rng: random.Random) -> int:
    """One or two moments early in a burst, each killing one or both workers."""
    kills = 0
    for _ in range(rng.randint(1, 2)):
        time.sleep(rng.uniform(0.05, 0.8))
        workers = mirror.pids()[1:]
        for pid in rng.sample(workers, rng.randint(1, len(workers))) if workers else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                kills += 1
    return kills


def test_kill_9_at_random_moments_of_a_burst_of_fills(
    upstream: QuirkyUpstream, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    blobs = [upstream.registry.add_blob(os.urandom(rng.randint(32, 768) * 1024)) for _ in range(12)]
    cache = tmp_path / "cache"
    entry = {"name": "docker.io", "url": upstream.url, "retries": 0}
    # A cap below the blobs' total: evictions race adoptions too.
    mirror = MirrorProcess([entry], workers=2, cache_dir=cache, max_size=4 * 1024 * 1024)
    results: list[tuple[str, tuple[str, str]]] = []
    kills = 0
    with mirror:
        for round_ in range(ROUNDS):
            upstream.no_length = round_ % 2 == 1
            urls = [d for d in blobs for _ in range(2)]
            rng.shuffle(urls)
            with concurrent.futures.ThreadPoolExecutor(17) as pool:
                killer = pool.submit(_kill_workers_at_random_moments, mirror, rng)
                pulls = pool.map(_pull, [f"{mirror.url}/v2/library/x/blobs/{d}" for d in urls])
                results += zip(urls, pulls, strict=True)
                kills += killer.result()
        mirror.stop(kill=True)
        # As if the grace period had passed: what the crashes left is now reclaimable.
        then = time.time() - ORPHAN_GRACE_SECONDS - 60
        for name in _blob_files(cache):
            os.utime(cache / name, (then, then))
        mirror.start()
        deadline = time.monotonic() + 30
        while _blob_files(cache) != set(_index(cache)):  # the start-up sweep runs
            assert time.monotonic() < deadline, (
                f"seed {seed}: files {_blob_files(cache)} vs index {_index(cache)}"
            )
            time.sleep(0.05)
        for name, digest in _index(cache).items():
            with (cache / name).open("rb") as file:
                assert "sha256:" + hashlib.file_digest(file, "sha256").hexdigest() == digest
        assert list((cache / "tmp").iterdir()) == []
        # Every blob is still pullable, whole and right.
        for digest in blobs:
            assert _pull(f"{mirror.url}/v2/library/x/blobs/{digest}") == ("ok", digest)
        wait_http_ok(f"{mirror.url}/v2/")
        mirror.wait_fills_settled()
    wrong = [(d, r) for d, r in results if r[0] == "ok" and r[1] != d]
    outcomes = Counter(r[0] for _, r in results)
    assert wrong == [], f"seed {seed}: {len(wrong)} complete-looking wrong responses"
    assert kills > 0 and outcomes["ok"] > 0, (seed, kills, outcomes)
    errors = Counter(r for _, r in results if r[0] not in ("ok", "aborted"))
    assert not errors, (seed, errors)
