"""Which S3 client library the object-storage back end uses: measured, not guessed.

Starts one SeaweedFS (``weed mini``, tests/support/seaweed.py) and runs the same steps with
each candidate in a fresh interpreter (so import time and memory are its own):

- import time and peak RSS (after everything below, 256 MiB transfers included);
- 1 KiB GET latency, p50/p99, 16 concurrent tasks;
- 64 MiB and 256 MiB PUT from a file (multipart, 8 MiB parts) and GET streamed to nowhere;
- create-only PUT of an existing key refused (``If-None-Match: *`` -> 412);
- create-only *multipart* upload (bounded memory) possible, and refused when present;
- listing unfinished multipart uploads possible (to abort those of killed fills);
- a presigned GET fetched with httpx.

    .venv/bin/python -m bench.s3_clients [--rounds 3]

Needs ``obstore``, ``aiobotocore`` and ``boto3`` installed beside the test extra.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
PART = 8 * MiB
IN_FLIGHT = 4
LIBRARIES = ("obstore", "aiobotocore", "boto3")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latency(
    get: Callable[[], Awaitable[bytes]], tasks: int = 16, each: int = 60
) -> dict[str, float]:
    for _ in range(tasks):
        await get()  # warm the connection pool
    samples: list[float] = []

    async def worker() -> None:
        for _ in range(each):
            started = time.perf_counter()
            body = await get()
            samples.append(time.perf_counter() - started)
            assert len(body) == 1024

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - started
    return {
        "p50_ms": 1000 * _percentile(samples, 0.5),
        "p99_ms": 1000 * _percentile(samples, 0.99),
        "ops_s": len(samples) / elapsed,
    }


async def _throughput(
    put: Callable[[str, Path], Awaitable[None]],
    get: Callable[[str], Awaitable[int]],
    files: dict[int, Path],
    rounds: int,
) -> dict[str, float]:
    out: dict[str, float] = {}
    for size, path in files.items():
        puts, gets = [], []
        for round_ in range(rounds):
            key = f"{os.environ['BENCH_LIBRARY']}/big/{size}/{round_}"
            started = time.perf_counter()
            await put(key, path)
            puts.append(size / (time.perf_counter() - started))
            started = time.perf_counter()
            assert await get(key) == size
            gets.append(size / (time.perf_counter() - started))
        out[f"put_{size // MiB}MiB_MiB_s"] = statistics.median(puts) / MiB
        out[f"get_{size // MiB}MiB_MiB_s"] = statistics.median(gets) / MiB
    return out


async def _presigned_ok(url: str, expected: bytes) -> bool:
    import httpx

    async with httpx.AsyncClient(trust_env=False) as http:
        good = await http.get(url)
        bad = await http.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
    return good.status_code == 200 and good.content == expected and bad.status_code == 403


# --- obstore ------------------------------------------------------------------------------------


async def run_obstore(env: dict[str, str], files: dict[int, Path], rounds: int) -> dict[str, Any]:
    started = time.perf_counter()
    import obstore
    from obstore.exceptions import AlreadyExistsError
    from obstore.store import S3Store

    imported = time.perf_counter() - started
    from datetime import timedelta

    store = S3Store(
        env["bucket"],
        endpoint=env["url"],
        access_key_id=env["access_key"],
        secret_access_key=env["secret_key"],
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )
    await obstore.put_async(store, "small", b"x" * 1024)

    async def get_small() -> bytes:
        result = await obstore.get_async(store, "small")
        return bytes(await result.bytes_async())

    async def put(key: str, path: Path) -> None:
        await obstore.put_async(store, key, path, chunk_size=PART, max_concurrency=IN_FLIGHT)

    async def get(key: str) -> int:
        result = await obstore.get_async(store, key)
        total = 0
        async for chunk in result.stream(min_chunk_size=MiB):
            total += len(chunk)
        return total

    results: dict[str, Any] = {"import_s": imported}
    results["get_1KiB_16"] = await _latency(get_small)
    results.update(await _throughput(put, get, files, rounds))
    try:
        await obstore.put_async(store, "small", b"y" * 1024, mode="create")
        results["create_only_refused"] = False
    except AlreadyExistsError:
        results["create_only_refused"] = True
    # put(mode="create") is documented as never multipart: the whole input in memory.
    results["create_only_multipart"] = "no (mode=create forces one PUT, input in memory)"
    results["list_multipart_uploads"] = "no (object_store has no such call)"
    url = await obstore.sign_async(store, "GET", "small", timedelta(seconds=60))
    results["presigned_get_ok"] = await _presigned_ok(url, b"x" * 1024)
    return results


# --- aiobotocore / boto3: the same hand-written multipart upload --------------------------------


def _parts(path: Path) -> list[tuple[int, int, int]]:
    size = path.stat().st_size
    return [
        (n + 1, offset, min(PART, size - offset)) for n, offset in enumerate(range(0, size, PART))
    ]


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


async def run_aiobotocore(
    env: dict[str, str], files: dict[int, Path], rounds: int
) -> dict[str, Any]:
    started = time.perf_counter()
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    imported = time.perf_counter() - started
    session = get_session()
    config = AioConfig(
        s3={"addressing_style": "path"}, max_pool_connections=32, signature_version="s3v4"
    )
    async with session.create_client(
        "s3",
        endpoint_url=env["url"],
        aws_access_key_id=env["access_key"],
        aws_secret_access_key=env["secret_key"],
        region_name="us-east-1",
        config=config,
    ) as s3:
        bucket = env["bucket"]
        await s3.put_object(Bucket=bucket, Key="small", Body=b"x" * 1024)

        async def get_small() -> bytes:
            response = await s3.get_object(Bucket=bucket, Key="small")
            async with response["Body"] as body:
                return bytes(await body.read())

        async def multipart(key: str, path: Path, **complete: Any) -> bool:
            upload = (await s3.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
            limit = asyncio.Semaphore(IN_FLIGHT)

            async def send(number: int, offset: int, length: int) -> dict[str, Any]:
                async with limit:
                    data = await asyncio.to_thread(_read, path, offset, length)
                    answer = await s3.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=data
                    )
                    return {"PartNumber": number, "ETag": answer["ETag"]}

            parts = await asyncio.gather(*(send(*part) for part in _parts(path)))
            try:
                await s3.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload,
                    MultipartUpload={"Parts": parts},
                    **complete,
                )
                return True
            except s3.exceptions.ClientError as exc:
                await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
                if exc.response["Error"]["Code"] == "PreconditionFailed":
                    return False
                raise

        async def put(key: str, path: Path) -> None:
            await multipart(key, path)

        async def get(key: str) -> int:
            response = await s3.get_object(Bucket=bucket, Key=key)
            total = 0
            async with response["Body"] as body:
                async for chunk in body.iter_chunks(MiB):
                    total += len(chunk)
            return total

        results: dict[str, Any] = {"import_s": imported}
        results["get_1KiB_16"] = await _latency(get_small)
        results.update(await _throughput(put, get, files, rounds))
        try:
            await s3.put_object(Bucket=bucket, Key="small", Body=b"y", IfNoneMatch="*")
            results["create_only_refused"] = False
        except s3.exceptions.ClientError as exc:
            results["create_only_refused"] = exc.response["Error"]["Code"] == "PreconditionFailed"
        smallest = min(files.values(), key=lambda path: path.stat().st_size)
        first = await multipart(
            f"{os.environ['BENCH_LIBRARY']}/mp-create", smallest, IfNoneMatch="*"
        )
        second = await multipart(
            f"{os.environ['BENCH_LIBRARY']}/mp-create", smallest, IfNoneMatch="*"
        )
        results["create_only_multipart"] = f"yes (first {first}, second {second})"
        listing = await s3.list_multipart_uploads(Bucket=bucket)
        results["list_multipart_uploads"] = f"yes ({len(listing.get('Uploads', []))} open)"
        url = await s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "small"}, ExpiresIn=60
        )
        results["presigned_get_ok"] = await _presigned_ok(url, b"x" * 1024)
        return results


async def run_boto3(env: dict[str, str], files: dict[int, Path], rounds: int) -> dict[str, Any]:
    started = time.perf_counter()
    import boto3
    from botocore.config import Config

    imported = time.perf_counter() - started
    s3 = boto3.client(
        "s3",
        endpoint_url=env["url"],
        aws_access_key_id=env["access_key"],
        aws_secret_access_key=env["secret_key"],
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"}, max_pool_connections=32, signature_version="s3v4"
        ),
    )
    bucket = env["bucket"]
    s3.put_object(Bucket=bucket, Key="small", Body=b"x" * 1024)

    async def get_small() -> bytes:
        return await asyncio.to_thread(
            lambda: s3.get_object(Bucket=bucket, Key="small")["Body"].read()
        )

    def multipart(key: str, path: Path) -> None:
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

        def send(number: int, offset: int, length: int) -> dict[str, Any]:
            answer = s3.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload,
                PartNumber=number,
                Body=_read(path, offset, length),
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            parts = list(pool.map(lambda part: send(*part), _parts(path)))
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload,
            MultipartUpload={"Parts": parts},
            IfNoneMatch="*",
        )

    async def put(key: str, path: Path) -> None:
        await asyncio.to_thread(multipart, key, path)

    def read_all(key: str) -> int:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        return sum(len(chunk) for chunk in body.iter_chunks(MiB))

    async def get(key: str) -> int:
        return await asyncio.to_thread(read_all, key)

    results: dict[str, Any] = {"import_s": imported}
    results["get_1KiB_16"] = await _latency(get_small)
    results.update(await _throughput(put, get, files, rounds))
    try:
        s3.put_object(Bucket=bucket, Key="small", Body=b"y", IfNoneMatch="*")
        results["create_only_refused"] = False
    except s3.exceptions.ClientError as exc:
        results["create_only_refused"] = exc.response["Error"]["Code"] == "PreconditionFailed"
    results["create_only_multipart"] = "yes (same calls as aiobotocore)"
    results["list_multipart_uploads"] = "yes"
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "small"}, ExpiresIn=60
    )
    results["presigned_get_ok"] = await _presigned_ok(url, b"x" * 1024)
    return results


def child(library: str) -> None:
    env = json.loads(os.environ["BENCH_S3"])
    files = {int(size): Path(path) for size, path in env["files"].items()}
    runner = {"obstore": run_obstore, "aiobotocore": run_aiobotocore, "boto3": run_boto3}[library]
    results = asyncio.run(runner(env, files, 1))
    results["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=LIBRARIES)
    parser.add_argument("--only", choices=LIBRARIES, action="append")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from tests.support.seaweed import SeaweedS3

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as work:
        files = {}
        for size in (64 * MiB, 256 * MiB):
            path = Path(work) / f"{size}.bin"
            with open(path, "wb") as out:
                for _ in range(size // MiB):
                    out.write(os.urandom(MiB))
            files[size] = str(path)
        started = time.perf_counter()
        with SeaweedS3(bucket="bench") as server:
            print(f"weed mini ready in {time.perf_counter() - started:.2f} s", flush=True)
            endpoint = server.endpoint
            env = {
                "url": endpoint.url,
                "bucket": endpoint.bucket,
                "access_key": endpoint.access_key,
                "secret_key": endpoint.secret_key,
                "files": files,
            }
            runs: dict[str, list[dict[str, Any]]] = {}
            # Libraries take turns, round by round: the machine's load drifts.
            for round_ in range(args.rounds):
                for library in args.only or LIBRARIES:
                    output = subprocess.run(
                        [sys.executable, "-m", "bench.s3_clients", "--child", library],
                        env={
                            **os.environ,
                            "BENCH_S3": json.dumps(env),
                            "BENCH_LIBRARY": f"{library}-{round_}",
                        },
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if output.returncode != 0:
                        print(f"{library}: failed\n{output.stderr[-3000:]}", flush=True)
                        continue
                    result = json.loads(output.stdout)
                    result["load_1min"] = os.getloadavg()[0]
                    print(f"round {round_} {library}: {json.dumps(result)}", flush=True)
                    runs.setdefault(library, []).append(result)
            for library, results in runs.items():
                summary = json.dumps(_median(results), indent=1)
                print(f"{library} (median of {len(results)}): {summary}")


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name, first in results[0].items():
        if isinstance(first, dict):
            merged[name] = _median([result[name] for result in results])
        elif isinstance(first, float | int) and not isinstance(first, bool):
            merged[name] = round(statistics.median(result[name] for result in results), 3)
        else:
            merged[name] = first
    return merged


if __name__ == "__main__":
    main()
