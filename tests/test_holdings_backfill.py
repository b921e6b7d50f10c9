"""A cache from before holdings were recorded: the backfill from its tag records runs behind
serving, stops when told, and the next start goes on from where it stopped.

Real stores on real files; the server case runs ``mirror serve`` offline on such a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from mirror import holdings
from mirror.holdings import _BACKFILLED, _Records
from mirror.manifest import MANIFEST_TYPES, OCI_MANIFEST
from mirror.reference import Digest
from mirror.storage.disk import Store
from mirror.storage.locks import FileLock
from tests.support.mirror import MirrorProcess

ACCEPT = {"Accept": ", ".join(MANIFEST_TYPES)}


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _old_cache(directory: Path, repositories: int) -> list[tuple[str, Digest, Digest]]:
    """What an older version left: manifests and tag records, no holdings. Returns each
    repository's (name, manifest digest, config digest)."""
    store = Store(directory, 1 << 40)
    made = []
    for i in range(repositories):
        config = _digest(f"config {i}".encode())
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": str(config), "size": 9},
                "layers": [],
            }
        ).encode()  # fmt: skip
        digest = _digest(body)
        name = f"team/app{i}"
        store.put_manifest(digest, OCI_MANIFEST, body)
        store.put_tag("docker.io", name, "1", MANIFEST_TYPES, digest, OCI_MANIFEST)
        made.append((name, digest, config))
    store.close()
    return made


def _backfilled(cache: Path) -> bool:
    with sqlite3.connect(cache / "holdings" / "cache.db") as db:
        rows = db.execute("SELECT 1 FROM Cache WHERE key = ?", (_BACKFILLED,)).fetchall()
    return bool(rows)


def test_the_backfill_stops_between_batches_and_the_next_start_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(holdings, "_BATCH", 2)
    made = _old_cache(tmp_path, 5)
    store = Store(tmp_path, 1 << 40)
    records = _Records(tmp_path / "holdings", 100)
    stop = threading.Event()
    read = store.tag_targets

    def stop_after_this_batch(*args: object, **kwargs: object) -> object:
        stop.set()  # as a SIGTERM would, while the first batch is under way
        return read(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "tag_targets", stop_after_this_batch)
    records.backfill(store, stop)
    held = [records.holds(store, "docker.io", n, d) for n, d, _ in made]
    records.close()
    assert not _backfilled(tmp_path)
    # Before it is over, a repository's own tag records answer (the first two were done).
    assert held == [True] * 5

    monkeypatch.setattr(store, "tag_targets", read)
    again = _Records(tmp_path / "holdings", 100)
    with caplog.at_level(logging.WARNING, logger="mirror.holdings"):
        again.backfill(store, threading.Event())
    assert "recorded repository holdings from 3 tag records" in caplog.text  # not 5
    assert _backfilled(tmp_path)
    for name, digest, config in made:
        assert again.holds(store, "docker.io", name, digest)
        assert again.holds(store, "docker.io", name, config)
        assert not again.holds(store, "docker.io", "team/other", digest)
    again.close()
    store.close()


def test_a_server_answers_during_the_backfill_and_stops_on_sigterm(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    made = _old_cache(cache, 3)
    upstreams = [{"name": "docker.io", "url": "http://127.0.0.1:9"}]
    # Another worker's backfill under way: this server's waits behind it, never done.
    (cache / "holdings").mkdir()
    other = FileLock(cache / "holdings" / "backfill.lock")
    assert other.try_acquire()
    server = MirrorProcess(upstreams, workdir=tmp_path / "mirror", cache_dir=cache, offline=True)
    try:
        server.start()
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        name, digest, config = made[1]
        # Held by the repository's tag record: served offline, as after the backfill.
        response = httpx.get(f"{server.url}/v2/{name}/manifests/{digest}", headers=ACCEPT)
        assert response.status_code == 200
        assert _digest(response.content) == digest
        response = httpx.get(f"{server.url}/v2/team/other/manifests/{digest}", headers=ACCEPT)
        assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert not _backfilled(cache)

        process = server.process
        assert process is not None
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)  # uvicorn ends by raising the signal again, once shut down
        assert "Application shutdown complete" in server.log(), server.log()
        server.process = None

        other.release()  # the other worker is gone: the next start does it all
        server.start()
        deadline = time.monotonic() + 120  # a bound on a hang, not a timing
        while not _backfilled(cache):
            assert server.process is not None and server.process.poll() is None
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert "recorded repository holdings from 3 tag records" in server.log()
        for name, digest, _ in made:
            response = httpx.get(f"{server.url}/v2/{name}/manifests/{digest}", headers=ACCEPT)
            assert response.status_code == 200
    finally:
        other.release()
        server.close()
