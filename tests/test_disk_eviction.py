"""The disk store at scale: batched eviction, the per-kind counters, the one orphan sweeper.

Real stores on real files; the two-process cases run a second Python process on the same
cache directory, as a second worker would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mirror.admin.inventory import Inventory
from mirror.reference import Digest
from mirror.storage import disk
from mirror.storage.disk import ORPHAN_GRACE_SECONDS, Store

KiB = 1024


def _adopt(store: Store, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    temp = store.tmp_dir / f"fill-{digest.hex}"
    temp.write_bytes(data)
    store.adopt_blob(temp, digest)
    return digest


def _data(i: int, size: int) -> bytes:
    return hashlib.sha512(i.to_bytes(4, "big")).digest() * (size // 64)


def _fill(store: Store, sizes: list[int]) -> list[str]:
    """Blobs of these sizes, the first the least recently used; their index keys."""
    keys = [f"blob:{_adopt(store, _data(i, size))}" for i, size in enumerate(sizes)]
    # One second apart, oldest first: the order eviction must follow.
    with store.index.transact():
        for age, key in enumerate(reversed(keys), start=1):
            store.index._sql(
                "UPDATE Cache SET access_time = ? WHERE key = ?", (time.time() - age, key)
            )
    return keys


def _keys(directory: Path) -> set[str]:
    with sqlite3.connect(directory / "cache.db") as db:
        return {k for (k,) in db.execute("SELECT key FROM Cache")}


def _consistent(directory: Path) -> None:
    """Every blob file has its entry and every entry its file, and diskcache's books (count,
    size) equal what the rows say."""
    files = {str(p.relative_to(directory)) for p in (directory / "blobs").rglob("*") if p.is_file()}
    with sqlite3.connect(directory / "cache.db") as db:
        named = {f for (f,) in db.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        books = dict(db.execute("SELECT key, value FROM Settings WHERE key IN ('count', 'size')"))
        count, size = db.execute("SELECT COUNT(*), coalesce(SUM(size), 0) FROM Cache").fetchone()
    assert files == named
    assert books == {"count": count, "size": size}


def _counted(directory: Path) -> dict[str, int]:
    """Entries by kind as a full scan counts them (what facts() did on every call)."""
    counts = dict.fromkeys(("blob", "manifest", "tag", "tags", "missing", "referrers"), 0)
    with sqlite3.connect(directory / "cache.db") as db:
        for kind, n in db.execute(
            "SELECT substr(key, 1, instr(key, ':') - 1), COUNT(*) FROM Cache GROUP BY 1"
        ):
            if kind in counts:
                counts[kind] = n
    return counts


def test_eviction_takes_just_enough_of_the_least_recently_used_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk, "_CULL_BATCH", 3)  # many transactions for a few entries
    sizes = [(40 + 7 * (i % 5)) * KiB for i in range(24)]
    store = Store(tmp_path, 1 << 40)
    keys = _fill(store, sizes)
    volume, _, _ = store.facts()
    store.close()
    # Room for all but the 10 oldest and half of the 11th: 11 must go, in LRU order.
    cap = volume - sum(sizes[:10]) - sizes[10] // 2
    small = Store(tmp_path, cap)
    newest = _adopt(small, b"x")  # a write culls
    after, _, _ = small.facts()
    left = _keys(tmp_path)
    assert left == {*keys[11:], f"blob:{newest}"}
    assert after <= cap < after + sizes[10]  # not one entry more than needed
    _consistent(tmp_path)
    handle = small.open_blob(newest)
    assert handle is not None and handle.read() == b"x"
    handle.close()
    small.close()


def test_eviction_skips_pinned_entries_and_counts_them_against_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk, "_CULL_BATCH", 2)
    size = 32 * KiB
    store = Store(tmp_path, 1 << 40)
    keys = _fill(store, [size] * 12)
    pinned = [keys[0], keys[2], keys[5]]  # what admin/inventory.py writes when pinning
    store.index._sql("INSERT INTO Pinned VALUES (?), (?), (?)", pinned)
    volume, _, _ = store.facts()
    store.close()
    small = Store(tmp_path, volume - 4 * size - size // 2)  # five entries must go
    small.put_manifest(Digest("sha256", "0" * 64), "application/json", b"{}")
    left = _keys(tmp_path)
    assert set(pinned) <= left
    unpinned = [k for k in keys if k not in pinned]
    assert not left & set(unpinned[:5]) and set(unpinned[5:]) <= left
    _consistent(tmp_path)
    small.close()
    # Everything left unpinned goes under a cap the pinned ones alone exceed; they stay.
    tiny = Store(tmp_path, 1)
    tiny.put_tag_list("docker.io", "library/a", ["1"])
    assert _keys(tmp_path) == set(pinned)
    _consistent(tmp_path)
    tiny.close()


def test_hits_during_a_cull_find_whole_blobs_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob whose entry is gone may still be open; an open entry's file never is gone."""
    monkeypatch.setattr(disk, "_CULL_BATCH", 4)
    store = Store(tmp_path, 1 << 40)
    blobs = [_adopt(store, _data(i, 8 * KiB)) for i in range(40)]
    handles = [store.open_blob(d) for d in blobs[:10]]  # being served while evicted
    volume, _, _ = store.facts()
    store.close()
    small = Store(tmp_path, volume // 2)
    _adopt(small, b"trigger")
    gone = 0
    for i, digest in enumerate(blobs):
        handle = small.open_blob(digest)
        if handle is None:
            gone += 1
            continue
        assert handle.read() == _data(i, 8 * KiB)
        handle.close()
    assert gone >= 20
    for i, handle in enumerate(handles):  # opened before, read after their eviction
        assert handle is not None and handle.read() == _data(i, 8 * KiB)
        handle.close()
    _consistent(tmp_path)
    small.close()


_CULLER = """
import sys
from pathlib import Path
from mirror.storage import disk
from mirror.storage.disk import Store

disk._CULL_BATCH = 4  # many short transactions, for the other process to come between
store = Store(Path(sys.argv[1]), int(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()
print(store.put_tag_list("docker.io", "library/culled", ["1"]), flush=True)
store.close()
"""


def test_adoptions_in_another_process_during_a_large_cull_stay_whole(tmp_path: Path) -> None:
    size = 4 * KiB
    store = Store(tmp_path, 1 << 40)
    old = _fill(store, [size] * 300)
    volume, _, _ = store.facts()
    store.close()
    cap = volume // 3
    culler = subprocess.Popen(
        [sys.executable, "-c", _CULLER, str(tmp_path), str(cap)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert culler.stdin is not None and culler.stdout is not None
    try:
        assert culler.stdout.readline() == "ready\n"
        adopter = Store(tmp_path, cap)
        culler.stdin.write("go\n")
        culler.stdin.flush()
        adopted = [_adopt(adopter, _data(1000 + i, size)) for i in range(60)]
        assert culler.stdout.readline().strip().isdigit()  # its cull's count: it ran
        assert culler.wait(60) == 0
    finally:
        if culler.poll() is None:
            culler.kill()
            culler.wait()
    left = _keys(tmp_path)
    assert {f"blob:{d}" for d in adopted} <= left  # the newest stay
    assert not left & set(old[:100])  # the oldest went
    volume, _, _ = adopter.facts()
    assert volume <= cap
    for i, digest in enumerate(adopted):
        handle = adopter.open_blob(digest)
        assert handle is not None and handle.read() == _data(1000 + i, size)
        handle.close()
    _consistent(tmp_path)
    adopter.close()


def _access_times(directory: Path) -> dict[str, float]:
    with contextlib.closing(sqlite3.connect(directory / "cache.db")) as db:
        return dict(db.execute("SELECT key, access_time FROM Cache"))


def test_reads_do_not_wait_for_a_write_under_way_and_still_count_as_uses(
    tmp_path: Path,
) -> None:
    """An eviction's batch (or any worker's write) holds the index's write lock: a hit
    read from the index answers meanwhile, and its use is written once the lock is free."""
    store = Store(tmp_path, 1 << 40)
    blob = _adopt(store, b"blob bytes")
    manifest = Digest("sha256", "1" * 64)
    store.put_manifest(manifest, "application/json", b"{}")
    store.put_tag("docker.io", "a", "1", ("application/json",), manifest, "application/json")
    store.close()
    before = _access_times(tmp_path)
    reader = Store(tmp_path, 1 << 40)  # another worker: nothing of it in memory
    reader.index.close()
    reader.index._timeout = 0  # no patience at all for a lock
    with contextlib.closing(sqlite3.connect(tmp_path / "cache.db", isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        handle = reader.open_blob(blob)
        assert handle is not None and handle.read() == b"blob bytes"
        handle.close()
        assert reader.get_manifest(manifest) == ("application/json", b"{}")
        tag = reader.get_tag("docker.io", "a", "1", ("application/json",))
        assert tag is not None and tag.digest == manifest
        assert reader.writable()
        db.execute("ROLLBACK")
    reader.close()  # writes the uses behind
    after = _access_times(tmp_path)
    assert all(after[key] > before[key] for key in before), (before, after)


def test_facts_count_entries_by_kind_through_adds_evictions_and_purges(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 40)
    blobs = [_adopt(store, _data(i, 2 * KiB)) for i in range(5)]
    manifests = [Digest("sha256", hashlib.sha256(b"m%d" % i).hexdigest()) for i in range(4)]
    for i, digest in enumerate(manifests):
        store.put_manifest(digest, "application/json", b"m%d" % i)
        store.put_tag("docker.io", "library/a", f"t{i}", ("application/json",), digest, "x")
    store.put_manifest(manifests[0], "application/json", b"m0")  # again: still one entry
    store.put_tag_list("docker.io", "library/a", ["t0"])
    store.put_referrers("docker.io", "library/a", manifests[0], b"{}")
    store.put_missing("docker.io/library/b:1", 60)
    assert store.facts()[1] == _counted(tmp_path)
    assert store.facts()[1]["blob"] == 5 and store.facts()[1]["tag"] == 4
    inventory = Inventory(store)
    inventory.purge("digest", digest=str(blobs[0]))
    inventory.purge("tag", upstream="docker.io", repository="library/a", tag="t1")
    store.index.delete(f"blob:{blobs[1]}")
    assert store.facts()[1] == _counted(tmp_path)
    assert store.facts()[1]["blob"] == 3 and store.facts()[1]["tag"] == 3
    volume, _, _ = store.facts()
    store.close()
    small = Store(tmp_path, volume - 3 * KiB)  # evicts
    _adopt(small, b"new")
    assert small.facts()[1] == _counted(tmp_path)
    assert small.facts()[0] <= volume - 3 * KiB
    small.close()


def test_facts_of_a_cache_from_before_the_counters_count_what_it_holds(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 40)
    _adopt(store, b"one")
    store.put_manifest(Digest("sha256", "1" * 64), "application/json", b"{}")
    store.close()
    with sqlite3.connect(tmp_path / "cache.db") as db:  # as an older version left it
        db.execute("DROP TRIGGER Kinds_insert")
        db.execute("DROP TRIGGER Kinds_delete")
        db.execute("DROP TABLE Kinds")
    older = Store(tmp_path, 1 << 40)
    _adopt(older, b"two")
    assert older.facts()[1] == _counted(tmp_path)
    assert older.facts()[1]["blob"] == 2
    older.close()
    again = Store(tmp_path, 1 << 40)  # counted once, not again at the next start
    assert again.facts()[1] == _counted(tmp_path)
    again.close()


def _orphan(directory: Path, like: Digest) -> Path:
    folder = directory / "blobs" / like.algorithm / like.hex[:2]
    path = folder / f"{like.hex}.{os.urandom(4).hex()}"
    path.write_bytes(b"left by a crash")
    then = time.time() - ORPHAN_GRACE_SECONDS - 60
    os.utime(path, (then, then))
    return path


def test_one_process_sweeps_orphans_and_another_takes_over_when_it_is_gone(
    tmp_path: Path,
) -> None:
    first = Store(tmp_path, 1 << 40)
    second = Store(tmp_path, 1 << 40)  # another worker: its own open of the lock file
    kept = _adopt(first, b"kept")
    orphan = _orphan(tmp_path, kept)
    assert first.reclaim_orphans() == 1  # the sweeper from now on
    assert not orphan.exists()
    orphan = _orphan(tmp_path, kept)
    assert second.reclaim_orphans() == 0
    assert orphan.exists()
    assert first.reclaim_orphans() == 1
    orphan = _orphan(tmp_path, kept)
    first.close()  # the sweeper exits (or dies: the kernel drops its lock alike)
    assert second.reclaim_orphans() == 1
    assert not orphan.exists()
    handle = second.open_blob(kept)
    assert handle is not None and handle.read() == b"kept"
    handle.close()
    _consistent(tmp_path)
    second.close()


def test_the_sweep_keeps_young_and_indexed_files_in_every_folder(tmp_path: Path) -> None:
    store = Store(tmp_path, 1 << 40)
    blobs = [_adopt(store, _data(i, KiB)) for i in range(40)]  # spread over many folders
    for path in (tmp_path / "blobs").rglob("*"):
        if path.is_file():  # indexed and old: stays
            os.utime(path, (time.time() - 10 * ORPHAN_GRACE_SECONDS,) * 2)
    orphans = [_orphan(tmp_path, d) for d in blobs[::4]]
    young = blobs[1].hex[:2]
    fresh = tmp_path / "blobs" / "sha256" / young / f"{blobs[1].hex}.fresh"
    fresh.write_bytes(b"mid-adoption")  # renamed in, not committed yet
    assert store.reclaim_orphans() == len(orphans)
    assert fresh.exists()
    fresh.unlink()
    _consistent(tmp_path)
    for i, digest in enumerate(blobs):
        handle = store.open_blob(digest)
        assert handle is not None and handle.read() == _data(i, KiB)
        handle.close()
    store.close()


def test_a_paced_sweep_rests_between_folders_for_the_share_it_does_not_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path, 1 << 40)
    blobs = [_adopt(store, _data(i, KiB)) for i in range(12)]
    orphans = [_orphan(tmp_path, d) for d in blobs[::3]]
    ticks = iter(range(10_000))  # each folder's work "takes" one tick
    rests: list[float] = []
    clock = SimpleNamespace(time=time.time, monotonic=lambda: next(ticks), sleep=rests.append)
    monkeypatch.setattr(disk, "time", clock)
    assert store.reclaim_orphans(share=0.25) == len(orphans)
    folders = {d.hex[:2] for d in blobs}
    assert rests == [3.0] * len(folders)
    store.close()
