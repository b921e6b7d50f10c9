"""What ``storage.redirect`` changes for a warm blob: a 64 MiB layer fetched with curl
from a replica's hot tier (200, the bytes through the replica) and through a 307 to a
presigned URL of the bucket (SeaweedFS), sequentially and 4 at a time; with the CPU
seconds the replica's process spent, which is what redirects take off it.

    .venv/bin/python -m bench.redirect [--rounds 5] [--size-mib 64]

Everything runs on this machine over loopback (SeaweedFS, redis-server, docker-registry,
two ``mirror serve``): the figures compare paths, not networks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mirror.reference import parse_digest
from mirror.storage.s3 import S3Objects
from tests.support.images import write_image
from tests.support.mirror import MirrorProcess
from tests.support.redis import RedisServer
from tests.support.registry import UpstreamRegistry
from tests.support.seaweed import S3Endpoint, SeaweedS3

MiB = 1024 * 1024


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def _curl(url: str) -> float:
    """Seconds to GET ``url`` to nowhere, following a redirect."""
    start = time.perf_counter()
    subprocess.run(["curl", "-sfL", "-o", "/dev/null", url], check=True)
    return time.perf_counter() - start


async def _put(s3: S3Endpoint, prefix: str, path: Path, digest: str) -> None:
    settings = s3.settings(prefix)
    async with S3Objects(settings) as objects:
        await objects.put_file(parse_digest(digest), path)


def _measure(mirror: MirrorProcess, url: str, size: int, rounds: int) -> dict[str, float]:
    cpu = _cpu_seconds(mirror.pids())
    single = [_curl(url) for _ in range(rounds)]
    with ThreadPoolExecutor(4) as pool:
        start = time.perf_counter()
        list(pool.map(_curl, [url] * (4 * rounds)))
        parallel = time.perf_counter() - start
    cpu = _cpu_seconds(mirror.pids()) - cpu
    return {
        "sequential_MiB_s": round(size / MiB / statistics.median(single), 1),
        "four_at_a_time_MiB_s": round(4 * rounds * size / MiB / parallel, 1),
        "replica_cpu_s_per_GiB": round(cpu / (5 * rounds * size / 1024 / MiB), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="bench-redirect-") as tmp:
        work = Path(tmp)
        image = write_image(work / "layout", "1", [size], seed=7)
        layer = image.layer_digests[0]
        prefix = f"bench-{uuid.uuid4().hex}/"
        with SeaweedS3() as seaweed, RedisServer() as redis, UpstreamRegistry() as upstream:
            upstream.push_image(image, "bench/big:1")
            s3 = seaweed.endpoint
            blob_file = image.layout_dir / "blobs" / "sha256" / parse_digest(layer).hex
            asyncio.run(_put(s3, prefix, blob_file, layer))
            env = {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "MIRROR_REDIS_URL": redis.url,
                "MIRROR_PEER_SECRET": "b" * 32,
            }
            results = {}
            for redirect in (False, True):
                storage = (
                    f'[storage]\nbackend = "s3"\nendpoint = "{s3.url}"\nbucket = "{s3.bucket}"\n'
                    f'prefix = "{prefix}"\nadvertise_url = "http://127.0.0.1:1"\n'
                    f"redirect = {'true' if redirect else 'false'}\n"
                )
                upstreams = [{"name": "docker.io", "url": upstream.url, "retries": 1}]
                name = "redirect" if redirect else "hot_tier"
                with MirrorProcess(
                    upstreams, extra_toml=storage, env=env, workdir=work / name
                ) as mirror:
                    url = f"{mirror.url}/v2/bench/big/blobs/{layer}"
                    manifest = f"{mirror.url}/v2/bench/big/manifests/1"
                    accept = "application/vnd.oci.image.manifest.v1+json"
                    subprocess.run(
                        ["curl", "-sf", "-o", "/dev/null", "-H", f"Accept: {accept}", manifest],
                        check=True,
                    )
                    _curl(url)  # warm: the hot tier fills (or the redirect is known good)
                    mirror.wait_fills_settled()
                    results[name] = _measure(mirror, url, size, args.rounds)
            print(json.dumps({"blob_MiB": args.size_mib, **results}, indent=2))


if __name__ == "__main__":
    main()
