"""What one record operation costs: Redis (a redis-server of its own on 127.0.0.1) against
the disk cache's index behind the same contract.

``python -m bench.records [--rounds 2000] [--concurrency 32] [--json PATH]`` (from the
repository root, after ``scripts/install test``). For each operation: p50/p99 of one call
awaited alone (the latency a request pays), and calls per second with ``--concurrency``
of them in flight (what one process gets out of it). Redis-only operations (leases,
holdings, eviction bookkeeping) are measured on Redis alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mirror.reference import Digest
from mirror.storage.base import MetadataStore
from mirror.storage.disk import Store
from mirror.storage.disk_records import DiskRecords
from mirror.storage.redis import RedisRecords, RedisSettings
from tests.support.redis import RedisServer

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
Operation = Callable[[int], Awaitable[object]]


async def _measure(operation: Operation, rounds: int, concurrency: int) -> dict[str, float]:
    latencies = []
    for i in range(rounds):
        started = time.perf_counter()
        await operation(i)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    queue = iter(range(rounds))

    async def worker() -> None:
        for i in queue:
            await operation(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "per_second": rounds / elapsed,
    }


def _contract(records: MetadataStore) -> dict[str, Operation]:
    digest = Digest.of(b"x")

    async def put_tag(i: int) -> None:
        await records.put_tag(
            "docker.io", f"library/r{i % 100}", "1", (MANIFEST,), digest, MANIFEST
        )

    async def get_tag(i: int) -> object:
        return await records.get_tag("docker.io", f"library/r{i % 100}", "1", (MANIFEST,))

    async def is_missing(i: int) -> object:
        return await records.is_missing(f"docker.io/library/r{i}:gone")

    async def repositories(i: int) -> object:
        return await records.repositories(f"library/r{i % 100}", 100)

    return {
        "put_tag": put_tag,
        "get_tag": get_tag,
        "is_missing": is_missing,
        "repositories(100)": repositories,
    }


def _redis_only(records: RedisRecords) -> dict[str, Operation]:
    digest = Digest.of(b"x")

    async def lease(i: int) -> None:
        held = await records.acquire(f"fill:{i}", "http://10.0.0.1:5000", 30)
        assert held is not None
        await held.release()

    async def holds(i: int) -> object:
        return await records.holds("docker.io", f"library/r{i % 100}", digest)

    async def touch_100(i: int) -> None:
        await records.touch_many({f"blob:{i % 1000 + k}": time.time() for k in range(100)})

    async def record_object(i: int) -> None:
        await records.record_object(f"blob:{i}", 1000 + i)

    async def least_recent(i: int) -> object:
        return await records.least_recent(100, time.time())

    return {
        "acquire+release": lease,
        "holds": holds,
        "record_object": record_object,
        "touch_many(100)": touch_100,
        "least_recent(100)": least_recent,
    }


async def _run(rounds: int, concurrency: int) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {"redis": {}, "disk": {}}
    with RedisServer() as server, tempfile.TemporaryDirectory() as directory:
        shared = RedisRecords(RedisSettings(server.url, prefix="bench:"))
        store = Store(Path(directory), max_size=1 << 30)
        disk = DiskRecords(store)
        try:
            for i in range(100):
                for records in (shared, disk):
                    await records.add_repository(f"library/r{i}")
            for name, records in (("redis", shared), ("disk", disk)):
                for operation, call in _contract(records).items():
                    results[name][operation] = await _measure(call, rounds, concurrency)
            for operation, call in _redis_only(shared).items():
                results["redis"][operation] = await _measure(call, rounds, concurrency)
        finally:
            await shared.aclose()
            store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("bench/results/records.json"))
    args = parser.parse_args()
    results = asyncio.run(_run(args.rounds, args.concurrency))
    print(f"{'operation':<20} {'back end':<8} {'p50 µs':>9} {'p99 µs':>9} {'calls/s':>9}")
    for name, operations in results.items():
        for operation, figures in operations.items():
            print(
                f"{operation:<20} {name:<8} {figures['p50_us']:>9.0f} {figures['p99_us']:>9.0f}"
                f" {figures['per_second']:>9.0f}"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
