"""What crashes and races between workers leave in the cache directory is reclaimed."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from mirror.reference import Digest
from mirror.storage.disk import ORPHAN_GRACE_SECONDS, Store


def _blob(store: Store, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    temp = store.tmp_dir / "fill"
    temp.write_bytes(data)
    store.adopt_blob(temp, digest)
    return digest


def _blob_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "blobs").glob("*/*/*") if p.is_file())


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_blob_files_the_index_does_not_name_are_removed_after_the_grace_period(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path, 1 << 30)
    kept = _blob(store, b"indexed")
    (indexed,) = _blob_files(tmp_path)
    # What kill -9 between an adoption's rename and its index commit leaves.
    old_orphan = indexed.with_name(indexed.name.split(".")[0] + ".dead0001")
    young_orphan = indexed.with_name(indexed.name.split(".")[0] + ".dead0002")
    old_orphan.write_bytes(b"indexed")
    young_orphan.write_bytes(b"indexed")
    for path in (indexed, old_orphan):
        _age(path, ORPHAN_GRACE_SECONDS + 60)
    assert store.reclaim_orphans() == 1
    assert _blob_files(tmp_path) == sorted([indexed, young_orphan])  # young: maybe mid-adoption
    handle = store.open_blob(kept)
    assert handle is not None and handle.read() == b"indexed"
    handle.close()
    store.close()


def test_an_adoption_survives_an_eviction_pruning_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diskcache prunes emptied directories on eviction; another worker's eviction can do
    so between this worker's makedirs and its rename."""
    store = Store(tmp_path, 1 << 30)
    makedirs = os.makedirs
    pruned: list[str] = []

    def makedirs_then_pruned(name: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        makedirs(name, mode, exist_ok)
        if not pruned and Path(name).parent.name == "sha256":
            pruned.append(str(name))
            os.removedirs(name)  # what the other worker's Disk.remove does

    monkeypatch.setattr(os, "makedirs", makedirs_then_pruned)
    digest = _blob(store, b"adopted")
    assert pruned
    monkeypatch.undo()
    handle = store.open_blob(digest)
    assert handle is not None and handle.read() == b"adopted"
    handle.close()
    store.close()
