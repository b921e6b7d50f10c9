"""The cache at scale: a mirror whose index holds N synthetic blobs, manifests and tag records.

``python -m bench.scale [--entries 100000 ...] [--json PATH]`` (from the repository root, after
``scripts/install test``). For each size, and for a 1,000-entry cache to compare with, it
builds a cache directory directly (files and index rows, as the mirror writes them), starts
``mirror serve`` on it (offline: hits only, no upstream) and measures:

- start-up: seconds from spawning the server to ``GET /v2/`` answering 200, and RSS then;
- hits: wrk going round 3,000 entries (1,000 config-sized blobs, 1,000 manifests by digest,
  1,000 tags; 500 of each in a 1,000-entry cache), 16 connections: a first pass (first
  sight: the index answers), then every entry asked once more (wrk's first pass need not
  reach them all), and a second pass (memory answers); p50/p99/max, requests/s; RSS after;
- housekeeping, before the server starts: ``Store.facts()`` (what each metrics scrape and
  status poll reads), the full count by kind it replaced, and one orphan sweep;
- eviction: another process (another worker would do the same) culls 10% of ``max_size``
  while wrk keeps hitting the newest entries, in windows back to back until the cull ends:
  the cull's seconds and entries, the volume after, and the worst window's p99/max;
- kill -9: the server is killed under load, started again (seconds to ready), a blob is
  served whole and the index passes SQLite's ``quick_check``.

Everything runs on 127.0.0.1 under one temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import diskcache
import httpx

from mirror.holdings import _BACKFILLED, _EXPANDED, _HELD
from mirror.manifest import MANIFEST_TYPES, OCI_MANIFEST
from mirror.storage.disk import Store
from tests.support.ports import free_port, wait_http_ok

from .load import run_wrk_mix
from .procs import tree_rss
from .profile import py_spy, summarize

MiB = 1024 * 1024
BLOB_SIZE = 1024  # a config blob
HITS = 1000  # entries of each kind the hit load goes round
_MODE_BINARY = 2  # diskcache.core.MODE_BINARY: the value is a file
_MODE_PICKLE = 4


def _blob(i: int) -> bytes:
    return hashlib.sha512(i.to_bytes(8, "big")).digest() * (BLOB_SIZE // 64)


def _manifest(i: int, config: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config, "size": BLOB_SIZE},
            "layers": [],
            "annotations": {"n": str(i)},
        }
    ).encode()  # fmt: skip


def build(directory: Path, entries: int) -> dict[str, Any]:
    """``entries`` blobs (files), as many manifests and tag records (index rows), the oldest
    first in LRU order; the index's schema is the mirror's own (a Store creates it, with the
    triggers that keep diskcache's books and the per-kind counters).

    Creating a real 1 KiB file costs ~1.7 ms on this machine (1,000,000: half an hour), a
    hard link ~0.06 ms: the blobs the hit load reads are real files with their own bytes,
    the others hard links to one filler file (1 KiB; ext4 allows 65,000 links per inode),
    never read. The index, listing, eviction and unlinking see one file per entry as usual.

    The repositories' holdings records (which digests each repository is known to hold) go
    in as the mirror would have written them when it cached these entries; without them the
    first start backfills them from the tag records, a one-time upgrade step of its own.

    The rows go in without triggers (a third of the time), then diskcache's books are set
    from the rows and a Store opens the index as one from before the per-kind counters:
    diskcache puts its triggers back, the store counts the kinds once (timed: what the
    first start after an upgrade costs).
    """
    started = time.monotonic()
    Store(directory, 1 << 50).close()
    db = sqlite3.connect(directory / "cache.db")
    db.execute("PRAGMA synchronous = OFF")
    for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("DROP TABLE Kinds")
    db.execute(f"PRAGMA cache_size = {-256 * 1024}")  # KiB: the key index is random-access
    accept = ",".join(MANIFEST_TYPES)
    now = time.time() - entries  # one second apart: a strict LRU order, newest last
    rows: list[tuple[Any, ...]] = []
    held: list[tuple[Any, ...]] = []
    holdings = _holdings(directory)
    fillers = directory.parent / "fillers"
    fillers.mkdir(exist_ok=True)
    real = entries - min(HITS, entries // 2)  # from here on: read by the hit load
    made: set[str] = set()

    def flush() -> None:
        db.executemany(
            "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count,"
            " tag, size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, NULL, ?, ?, ?, ?)",
            rows,
        )
        rows.clear()
        holdings.executemany(
            "INSERT OR REPLACE INTO Cache (key, raw, store_time, expire_time, access_time,"
            " access_count, tag, size, mode, filename, value)"
            " VALUES (?, 1, 0, NULL, 0, 0, NULL, 0, 1, NULL, ?)",
            held,
        )
        held.clear()

    for i in range(entries):
        data = _blob(i)
        hexdigest = hashlib.sha256(data).hexdigest()
        folder = f"blobs/sha256/{hexdigest[:2]}"
        if folder not in made:
            (directory / folder).mkdir(parents=True, exist_ok=True)
            made.add(folder)
        filename = f"{folder}/{hexdigest}.{i:08x}"
        if i >= real:
            (directory / filename).write_bytes(data)
        else:
            filler = fillers / str(i // 60_000)
            if i % 60_000 == 0:
                filler.write_bytes(data)
            os.link(filler, directory / filename)
        t = now + i
        rows.append((f"blob:sha256:{hexdigest}", t, t, len(data), _MODE_BINARY, filename, None))
        body = _manifest(i, f"sha256:{hexdigest}")
        manifest = hashlib.sha256(body).hexdigest()
        value = pickle.dumps((OCI_MANIFEST, body), protocol=pickle.HIGHEST_PROTOCOL)
        rows.append((f"manifest:sha256:{manifest}", t, t, 0, _MODE_PICKLE, None, value))
        record = (("sha256", manifest), OCI_MANIFEST, time.time())
        value = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        key = f"tag:docker.io/scale/r{i % 1000}:t{i}|{accept}"
        rows.append((key, t, t, 0, _MODE_PICKLE, None, value))
        holder = f"docker.io/scale/r{i % 1000}"
        held.append((f"{holder}@sha256:{manifest}", _EXPANDED))
        held.append((f"{holder}@sha256:{hexdigest}", _HELD))
        if len(rows) >= 30_000:
            flush()
    flush()
    db.execute("UPDATE Settings SET value = (SELECT COUNT(*) FROM Cache) WHERE key = 'count'")
    db.execute("UPDATE Settings SET value = (SELECT SUM(size) FROM Cache) WHERE key = 'size'")
    db.commit()
    db.close()
    holdings.execute("UPDATE Settings SET value = (SELECT COUNT(*) FROM Cache) WHERE key = 'count'")
    holdings.commit()
    holdings.close()
    built = time.monotonic()
    Store(directory, 1 << 50).close()
    return {"entries": entries, "seconds": round(time.monotonic() - started, 1),
            "first_open_seconds": round(time.monotonic() - built, 1),
            "blob_bytes": entries * BLOB_SIZE,
            "index_bytes": (directory / "cache.db").stat().st_size}  # fmt: skip


def _holdings(directory: Path) -> sqlite3.Connection:
    """The holdings index, marked as needing no backfill, open for bulk inserts."""
    records = diskcache.Cache(str(directory / "holdings"), eviction_policy="none")
    records.set(_BACKFILLED, True)
    records.close()
    db = sqlite3.connect(directory / "holdings" / "cache.db")
    db.execute("PRAGMA synchronous = OFF")
    for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        db.execute(f"DROP TRIGGER {trigger}")  # diskcache puts them back when it opens it
    return db


def housekeeping(directory: Path) -> dict[str, Any]:
    """What a metrics scrape or status poll costs (``facts``; the full count it replaced,
    for comparison) and one orphan sweep, before the server holds the sweeper's lock."""
    store = Store(directory, 1 << 40)
    try:
        facts = []
        for _ in range(5):
            started = time.monotonic()
            store.facts()
            facts.append(time.monotonic() - started)
        started = time.monotonic()
        with sqlite3.connect(directory / "cache.db") as db:
            db.execute(
                "SELECT substr(key, 1, instr(key, ':') - 1), COUNT(*) FROM Cache GROUP BY 1"
            ).fetchall()
        scan = time.monotonic() - started
        started = time.monotonic()
        removed = store.reclaim_orphans()
        sweep = time.monotonic() - started
    finally:
        store.close()
    return {"facts_ms": round(sorted(facts)[2] * 1000, 2), "full_count_ms": round(scan * 1000),
            "sweep_seconds": round(sweep, 2), "sweep_removed": removed}  # fmt: skip


def hit_requests(entries: int) -> list[tuple[str, dict[str, str]]]:
    """The newest ``HITS`` of each kind, at most half of them (eviction takes the oldest)."""
    accept = {"Accept": ", ".join(MANIFEST_TYPES)}
    requests: list[tuple[str, dict[str, str]]] = []
    for i in range(entries - min(HITS, entries // 2), entries):
        data = _blob(i)
        config = f"sha256:{hashlib.sha256(data).hexdigest()}"
        manifest = f"sha256:{hashlib.sha256(_manifest(i, config)).hexdigest()}"
        requests.append((f"/v2/scale/r{i % 1000}/blobs/{config}", {}))
        requests.append((f"/v2/scale/r{i % 1000}/manifests/{manifest}", accept))
        requests.append((f"/v2/scale/r{i % 1000}/manifests/t{i}", accept))
    return requests


class Server:
    def __init__(self, directory: Path, work: Path, max_size: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = work / "mirror.toml"
        self.log = work / "mirror.log"
        self.config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nworkers = 1\n'
            f'log_level = "warning"\n[cache]\ndirectory = {json.dumps(str(directory))}\n'
            f"max_size = {max_size}\noffline = true\n[[upstreams]]\n"
            'name = "docker.io"\nurl = "http://127.0.0.1:9"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        mirror = Path(sys.executable).parent / "mirror"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        began = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(mirror), "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        wait_http_ok(f"{self.url}/v2/", timeout=120, process=self.process,
                     stderr_path=self.log, name="mirror")  # fmt: skip
        return time.monotonic() - began

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wrk(server: Server, requests: list[tuple[str, dict[str, str]]], seconds: float,
         work: Path) -> dict[str, Any]:  # fmt: skip
    run = run_wrk_mix(server.url, requests, threads=2, connections=16, seconds=seconds,
                      workdir=work)  # fmt: skip
    return {
        "rps": round(run.requests_per_second),
        "p50_ms": run.p50_ms,
        "p99_ms": run.p99_ms,
        "max_ms": run.max_ms,
        "errors": sum(run.errors.values()),
        "requests": run.requests,
    }


def _ask_each(server: Server, requests: list[tuple[str, dict[str, str]]]) -> None:
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
        for path, headers in requests:
            client.get(path, headers=headers).raise_for_status()


def _cull(directory: Path, max_size: int, into: dict[str, Any]) -> None:
    store = Store(directory, max_size)
    try:
        started = time.monotonic()
        into["evicted_entries"] = store._cull()
        into["cull_seconds"] = round(time.monotonic() - started, 2)
    finally:
        store.close()


def measure(
    entries: int, work: Path, seconds: float, profile: Path | None = None
) -> dict[str, Any]:
    directory = work / "cache"
    result: dict[str, Any] = {"build": build(directory, entries)}
    result["housekeeping"] = housekeeping(directory)
    cap = 1 << 40
    server = Server(directory, work, cap)
    requests = hit_requests(entries)
    try:
        result["ready_seconds"] = round(server.start(), 2)
        result["rss_ready_mib"] = round(tree_rss(server.pid) / MiB, 1)
        result["hits_first_sight"] = _wrk(server, requests, seconds, work)
        _ask_each(server, requests)
        result["hits_warm"] = _wrk(server, requests, seconds, work)
        result["rss_after_hits_mib"] = round(tree_rss(server.pid) / MiB, 1)
        # evict 10% of a cap set to what the cache holds now
        with _Volume(directory) as volume:
            pass
        cap = int(volume.bytes * 0.9)
        evict: dict[str, Any] = {"volume_bytes": volume.bytes, "cap_bytes": cap}
        culler = threading.Thread(target=_cull, args=(directory, cap, evict))
        sampled: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if profile is not None:  # the server while it serves hits during the cull
            sampled = py_spy(server.pid, profile / f"eviction-{entries}.txt")
        with sampled:
            culler.start()
            # wrk runs back to back until the cull is over: the worst window is the figure
            windows: list[dict[str, Any]] = []
            while culler.is_alive() or not windows:
                windows.append(_wrk(server, requests, min(seconds, 5), work))
            culler.join()
        with _Volume(directory) as volume:
            pass
        evict["volume_after_bytes"] = volume.bytes
        evict["hits_during"] = max(windows, key=lambda w: w["p99_ms"])
        evict["hits_windows_p99_ms"] = [w["p99_ms"] for w in windows]
        evict["hits_errors"] = sum(w["errors"] for w in windows)
        result["eviction"] = evict
        # kill -9 under load, then start again
        loader = threading.Thread(target=lambda: _wrk(server, requests, 2, work))
        loader.start()
        time.sleep(1)
        server.stop(signal.SIGKILL)
        loader.join()
        again = server.start()
        path, headers = requests[-3]
        answer = httpx.get(server.url + path, headers=headers, timeout=30, trust_env=False)
        served = (
            answer.status_code == 200
            and hashlib.sha256(answer.content).hexdigest() == (path.rsplit(":", 1)[1])
        )
        with sqlite3.connect(directory / "cache.db") as db:
            (check,) = db.execute("PRAGMA quick_check").fetchone()
        result["after_kill_9"] = {"ready_seconds": round(again, 2), "blob_served": served,
                                  "quick_check": check}  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return result


class _Volume:
    """The index's idea of the cache's size (what culling compares with ``max_size``)."""

    def __init__(self, directory: Path) -> None:
        self.store = Store(directory, 1 << 40)

    def __enter__(self) -> _Volume:
        self.bytes = int(self.store._index.volume())
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--entries", type=int, action="append",
                        help="blobs (and as many manifests and tags) per cache; repeatable "
                        "(default: 100000)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=5, help="each wrk run (default: 5)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy profiles of the server during the evictions")  # fmt: skip
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    sizes = [1000, *(args.entries or [100_000])]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mirror-scale-") as tmp:
        for entries in sizes:
            work = Path(tmp) / str(entries)
            work.mkdir()
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"scale: {entries} blobs, manifests and tags (load {load}) …", flush=True)
            results[str(entries)] = measure(entries, work, args.seconds, args.profile)
            results[str(entries)]["load_average"] = [round(x, 1) for x in os.getloadavg()]
            print(json.dumps(results[str(entries)], indent=1), flush=True)
            if args.profile is not None:
                samples, rows = summarize(args.profile / f"eviction-{entries}.txt")
                print(f"server during the eviction: {samples} samples, inclusive/self:")
                for name, inclusive, own in rows:
                    print(f"  {inclusive:6.1%} {own:6.1%}  {name}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
