"""The ObjectStore contract, run against every implementation (today: S3 on a real SeaweedFS).

A back end joins by adding a case to ``backend`` below: its store, how to tell that an
upload has begun (to interrupt it there) and how many unfinished uploads it keeps.
The S3 back end's extras (presigned URLs, stale uploads, listing, a dead store) follow.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.reference import Digest
from mirror.storage.base import ObjectStore, StorageError, StorageUnavailable
from mirror.storage.s3 import S3Objects, S3Settings
from tests.support.seaweed import S3Endpoint, SeaweedS3

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part (SeaweedFS holds to it too)
MULTIPART = PART + 17  # two parts


@dataclass
class Backend:
    store: ObjectStore
    upload_begun: Callable[[Digest], Awaitable[bool]]  # some of the body was sent
    open_uploads: Callable[[], Awaitable[int]]  # unfinished uploads it still keeps


def s3_settings(endpoint: S3Endpoint, **overrides: object) -> S3Settings:
    options: dict[str, Any] = {
        "prefix": f"test-{uuid.uuid4().hex}/",
        "part_size": PART,
        **overrides,
    }
    return endpoint.settings(**options)


@pytest.fixture
async def s3(seaweed: S3Endpoint) -> AsyncIterator[S3Objects]:
    async with S3Objects(s3_settings(seaweed)) as store:
        yield store


async def _s3_open_uploads(store: S3Objects) -> int:
    return await store.abort_stale_uploads(older_than_seconds=10**9)  # aborts none, counts none


@pytest.fixture(params=["s3"])
async def backend(request: pytest.FixtureRequest, seaweed: S3Endpoint) -> AsyncIterator[Backend]:
    assert request.param == "s3"
    async with S3Objects(s3_settings(seaweed)) as store:
        client = store._s3

        async def upload_begun(digest: Digest) -> bool:
            key = store.blob_key(digest)
            uploads = await client.list_multipart_uploads(Bucket=store.settings.bucket, Prefix=key)
            for upload in uploads.get("Uploads", []):
                parts = await client.list_parts(
                    Bucket=store.settings.bucket, Key=key, UploadId=upload["UploadId"]
                )
                if parts.get("Parts"):
                    return True
            return False

        async def open_uploads() -> int:
            uploads = await client.list_multipart_uploads(
                Bucket=store.settings.bucket, Prefix=store.settings.prefix
            )
            return len(uploads.get("Uploads", []))

        yield Backend(store, upload_begun, open_uploads)


def blob_file(directory: Path, size: int) -> tuple[Digest, Path, bytes]:
    data = os.urandom(size)
    digest = Digest.of(data)
    path = directory / f"{digest.hex}.{uuid.uuid4().hex}"
    path.write_bytes(data)
    return digest, path, data


async def read(store: ObjectStore, digest: Digest, start: int = 0, end: int | None = None) -> bytes:
    async with store.open(digest, start, end) as reader:
        assert reader is not None
        return b"".join([chunk async for chunk in reader.chunks()])


# --- the contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, MULTIPART], ids=["one-put", "multipart"])
async def test_a_stored_blob_reads_back_whole_and_in_ranges(
    backend: Backend, tmp_path: Path, size: int
) -> None:
    store = backend.store
    digest, path, data = blob_file(tmp_path, size)
    assert await store.put_file(digest, path) is True
    assert await store.stat(digest) == size
    assert await read(store, digest) == data
    for start, end in [(0, 1), (5, 100), (size - 10, None), (PART - 3, PART + 3), (0, size)]:
        async with store.open(digest, start, end) as reader:
            assert reader is not None
            assert reader.size == size  # the whole object's, whatever the range
            assert b"".join([chunk async for chunk in reader.chunks()]) == data[start:end]


async def test_an_absent_object_is_none_not_an_error(backend: Backend) -> None:
    store = backend.store
    digest = Digest.of(b"never stored")
    assert await store.stat(digest) is None
    async with store.open(digest) as reader:
        assert reader is None
    async with store.open(digest, 10, 20) as reader:
        assert reader is None
    assert await store.get_manifest(digest) is None
    await store.delete(digest)


async def test_a_range_past_the_end_reads_nothing(backend: Backend, tmp_path: Path) -> None:
    digest, path, _ = blob_file(tmp_path, 100)
    await backend.store.put_file(digest, path)
    async with backend.store.open(digest, 100) as reader:
        assert reader is not None
        assert reader.size == 100
        assert [chunk async for chunk in reader.chunks()] == []


@pytest.mark.parametrize("size", [1000, MULTIPART], ids=["one-put", "multipart"])
async def test_racing_writers_of_one_digest_store_it_once(
    backend: Backend, tmp_path: Path, size: int
) -> None:
    digest, path, data = blob_file(tmp_path, size)
    copies = []
    for n in range(16):
        copy = tmp_path / f"copy{n}"
        copy.write_bytes(data)
        copies.append(copy)
    results = await asyncio.gather(*(backend.store.put_file(digest, copy) for copy in copies))
    assert results.count(True) == 1
    assert await read(backend.store, digest) == data
    assert await backend.open_uploads() == 0


@pytest.mark.parametrize("size", [1000, MULTIPART], ids=["one-put", "multipart"])
async def test_a_second_writer_changes_nothing(backend: Backend, tmp_path: Path, size: int) -> None:
    digest, path, data = blob_file(tmp_path, size)
    other = tmp_path / "other"
    other.write_bytes(os.urandom(size))  # not what the digest names: it must not land
    assert await backend.store.put_file(digest, path) is True
    assert await backend.store.put_file(digest, other) is False
    assert await read(backend.store, digest) == data


async def test_manifests_keep_their_media_type(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    index = b'{"schemaVersion":2,"manifests":[]}'
    image = b'{"schemaVersion":2,"layers":[]}'
    index_type = "application/vnd.oci.image.index.v1+json"
    image_type = "application/vnd.docker.distribution.manifest.v2+json"
    await store.put_manifest(Digest.of(index), index_type, index)
    await store.put_manifest(Digest.of(image), image_type, image)
    await store.put_manifest(Digest.of(image), image_type, image)  # again: harmless
    assert await store.get_manifest(Digest.of(index)) == (index_type, index)
    assert await store.get_manifest(Digest.of(image)) == (image_type, image)
    # A manifest is not a blob, and a blob of the same digest is kept apart.
    assert await store.stat(Digest.of(index)) is None
    path = tmp_path / "index-as-blob"
    path.write_bytes(index)
    assert await store.put_file(Digest.of(index), path) is True
    assert await store.get_manifest(Digest.of(index)) == (index_type, index)


async def test_delete_removes_blobs_and_manifests(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    digest, path, _ = blob_file(tmp_path, 500)
    await store.put_file(digest, path)
    body = b'{"schemaVersion":2}'
    await store.put_manifest(Digest.of(body), "application/vnd.oci.image.manifest.v1+json", body)
    await store.delete(digest)
    await store.delete(Digest.of(body))
    assert await store.stat(digest) is None
    assert await store.get_manifest(Digest.of(body)) is None
    await store.delete(digest)  # absent: no error
    assert await store.put_file(digest, path) is True  # and it can come back


async def test_an_interrupted_upload_leaves_nothing_readable(
    backend: Backend, tmp_path: Path
) -> None:
    digest, path, _ = blob_file(tmp_path, 16 * PART)
    upload = asyncio.ensure_future(backend.store.put_file(digest, path))
    while not await backend.upload_begun(digest):
        assert not upload.done(), "the upload ended before it could be interrupted"
        await asyncio.sleep(0.005)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert await backend.store.stat(digest) is None
    async with backend.store.open(digest) as reader:
        assert reader is None
    assert await backend.open_uploads() == 0
    assert await backend.store.put_file(digest, path) is True  # a later fill is not hindered


# --- the S3 back end beyond the contract --------------------------------------------------------


async def test_a_presigned_url_serves_the_blob_and_a_tampered_one_is_refused(
    s3: S3Objects, tmp_path: Path
) -> None:
    digest, path, data = blob_file(tmp_path, 2000)
    await s3.put_file(digest, path)
    url = await s3.presign(digest, expires_seconds=60)
    other = await s3.presign(Digest.of(b"other"), expires_seconds=60)
    signature = url.partition("X-Amz-Signature=")[2].partition("&")[0]
    async with httpx.AsyncClient(trust_env=False) as http:
        answer = await http.get(url)
        assert answer.status_code == 200
        assert answer.content == data
        tampered = url.replace(signature, signature[::-1])
        assert (await http.get(tampered)).status_code == 403
        other_signature = other.partition("X-Amz-Signature=")[2].partition("&")[0]
        assert (await http.get(url.replace(signature, other_signature))).status_code == 403


async def test_stale_uploads_of_killed_fills_are_aborted(s3: S3Objects) -> None:
    # What a fill killed mid-upload leaves: an upload begun, a part sent, never completed.
    key = s3.blob_key(Digest.of(b"killed"))
    upload = await s3._s3.create_multipart_upload(Bucket=s3.settings.bucket, Key=key)
    await s3._s3.upload_part(
        Bucket=s3.settings.bucket,
        Key=key,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 100,
    )
    assert await s3.abort_stale_uploads(older_than_seconds=3600) == 0  # too young
    assert await s3.abort_stale_uploads(older_than_seconds=0) == 1
    assert await s3.abort_stale_uploads(older_than_seconds=0) == 0
    assert await s3.stat(Digest.of(b"killed")) is None


async def test_the_listing_names_every_object_of_the_cache(s3: S3Objects, tmp_path: Path) -> None:
    digest, path, _ = blob_file(tmp_path, 1234)
    await s3.put_file(digest, path)
    body = b'{"schemaVersion":2}'
    await s3.put_manifest(Digest.of(body), "application/vnd.oci.image.manifest.v1+json", body)
    await s3._s3.put_object(Bucket=s3.settings.bucket, Key=f"{s3.settings.prefix}other", Body=b"")
    listed = {(item.kind, item.digest, item.size) async for item in s3.iter_objects()}
    assert listed == {("blob", digest, 1234), ("manifest", Digest.of(body), len(body))}
    assert all([item.modified > 0 async for item in s3.iter_objects()])


async def test_ping_says_whether_the_bucket_answers(s3: S3Objects, seaweed: S3Endpoint) -> None:
    await s3.ping()
    async with S3Objects(s3_settings(seaweed, bucket="no-such-bucket")) as missing:
        with pytest.raises(StorageError) as raised:
            await missing.ping()
        assert not isinstance(raised.value, StorageUnavailable)
    async with S3Objects(s3_settings(seaweed, secret_key="wrong")) as refused:
        with pytest.raises(StorageError):
            await refused.ping()


async def test_credentials_are_not_shown(seaweed: S3Endpoint) -> None:
    settings = s3_settings(seaweed, secret_key="wrong-secret-value")
    assert "wrong-secret-value" not in repr(settings)
    assert seaweed.access_key not in repr(settings)
    async with S3Objects(settings) as store:
        assert "wrong-secret-value" not in repr(store)
        with pytest.raises(StorageError) as raised:
            await store.stat(Digest.of(b"x"))
        assert "wrong-secret-value" not in str(raised.value)


async def test_a_stopped_store_is_unavailable(tmp_path: Path) -> None:
    with SeaweedS3(bucket="doomed") as server:
        settings = s3_settings(server.endpoint, connect_timeout=0.5, read_timeout=1.0, attempts=1)
        async with S3Objects(settings) as store:
            digest, path, _ = blob_file(tmp_path, 5000)
            assert await store.put_file(digest, path) is True
            server.stop()
            with pytest.raises(StorageUnavailable):
                await store.ping()
            with pytest.raises(StorageUnavailable):
                await store.stat(digest)
            with pytest.raises(StorageUnavailable):
                async with store.open(digest):
                    pass
            with pytest.raises(StorageUnavailable):
                await store.put_file(Digest.of(b"new"), path)
            with pytest.raises(StorageUnavailable):
                await store.get_manifest(digest)
            big, big_path, _ = blob_file(tmp_path, MULTIPART)
            with pytest.raises(StorageUnavailable):
                await store.put_file(big, big_path)
