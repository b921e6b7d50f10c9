"""Verified objects in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW, R2…).

Keys, under the configured prefix: ``blobs/<alg>/<hex>`` and ``manifests/<alg>/<hex>``.
A manifest's media type is the object's ``Content-Type``: S3 keeps and returns it with the
body, so it costs no extra header or parsing, and a client given a presigned URL of a
manifest is told the right type.

Why aiobotocore (bench/s3_clients.py has the figures): it is the one candidate that can
write a large blob create-only with bounded memory. The create-only guarantee must come
from the store (``If-None-Match: *`` on the PUT, or on CompleteMultipartUpload for big
blobs), because two replicas may fill the same blob at once and the loser must change
nothing. obstore writes create-only only as one PUT with the whole body in memory, and it
cannot list unfinished multipart uploads, which is how a killed fill's parts are found.

Every failure of the store is a ``StorageError``: unreachable, timed out or 5xx is
``StorageUnavailable``, out of room ``StorageFull``. Connect and read timeouts are short
so that a dead store costs a replica little. Credentials are never logged or shown
(``repr`` hides them; error messages name the operation and the key only).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from ..reference import Digest
from .base import ObjectReader, StorageError, StorageFull, StorageUnavailable

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = ["S3Objects", "S3Settings", "StoredObject", "StreamedUpload"]

MiB = 1024 * 1024
_MAX_PARTS = 10_000  # S3's limits on parts per upload, and on their size (all but the last)
_MIN_PART = 5 * MiB
_UNAVAILABLE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
_FULL_CODES = {"XMinioStorageFull", "InsufficientStorage", "QuotaExceeded", "EntityTooLarge"}
_ABSENT_CODES = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class S3Settings:
    """Where the bucket is and how patient to be with it."""

    bucket: str
    endpoint: str | None = None  # None: AWS itself, by region
    region: str = "us-east-1"
    prefix: str = ""  # e.g. "mirror/": several caches can share a bucket
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    addressing: Literal["path", "virtual", "auto"] = "path"  # most S3 servers want path
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    attempts: int = 2  # per request, the first included (botocore's "standard" retries)
    part_size: int = 8 * MiB  # multipart part size; smaller files go in one PUT
    parts_in_flight: int = 4  # memory used by one upload is at most this many parts
    claim_timeout: float = 60.0  # a writer's claim to complete a blob, if it never let go
    claim_wait: float = 5.0  # how long a writer waits for another's claim before giving up

    def __post_init__(self) -> None:
        if self.part_size < _MIN_PART:
            raise ValueError(f"part_size must be at least {_MIN_PART} (S3's smallest part)")
        if self.parts_in_flight < 1 or self.attempts < 1:
            raise ValueError("parts_in_flight and attempts must be at least 1")


@dataclass(frozen=True)
class StoredObject:
    """One object of the cache in the bucket, as listed."""

    key: str
    kind: Literal["blob", "manifest"]
    digest: Digest
    size: int
    modified: float  # seconds since the epoch


class _Reader:
    def __init__(self, size: int, body: AsyncIterator[bytes] | None) -> None:
        self.size = size
        self._body = body

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._body is None:
            return
        with _translated("read"):
            async for chunk in self._body:
                yield chunk


class S3Objects:
    """An ``ObjectStore`` in a bucket. Use as ``async with S3Objects(settings) as store``
    (or ``await store.start()`` … ``await store.close()``)."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._exits = AsyncExitStack()
        self._client: S3Client | None = None

    def __repr__(self) -> str:
        return f"S3Objects({self.settings!r})"

    async def start(self) -> None:
        # Imported here, not with the module: aiobotocore and aiohttp take a second or
        # more to import on a busy machine, and a mirror on its disk never uses them.
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        settings = self.settings
        config = AioConfig(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={"max_attempts": settings.attempts, "mode": "standard"},
            s3={"addressing_style": settings.addressing},
            signature_version="s3v4",
            max_pool_connections=64,
        )
        self._client = await self._exits.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=settings.endpoint,
                region_name=settings.region,
                aws_access_key_id=settings.access_key,
                aws_secret_access_key=settings.secret_key,
                config=config,
            )
        )

    async def close(self) -> None:
        self._client = None
        await self._exits.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            raise StorageError("S3Objects used before start() or after close()")
        return self._client

    def blob_key(self, digest: Digest) -> str:
        return f"{self.settings.prefix}blobs/{digest.algorithm}/{digest.hex}"

    def manifest_key(self, digest: Digest) -> str:
        return f"{self.settings.prefix}manifests/{digest.algorithm}/{digest.hex}"

    def claim_key(self, digest: Digest) -> str:
        return f"{self.settings.prefix}claims/{digest.algorithm}/{digest.hex}"

    # --- the ObjectStore contract ---------------------------------------------------------------

    async def stat(self, digest: Digest) -> int | None:
        return await self._size(self.blob_key(digest))

    def open(
        self, digest: Digest, start: int = 0, end: int | None = None
    ) -> AbstractAsyncContextManager[ObjectReader | None]:
        return self._open(self.blob_key(digest), start, end)

    @asynccontextmanager
    async def _open(
        self, key: str, start: int, end: int | None
    ) -> AsyncIterator[ObjectReader | None]:
        if end is not None and end <= start:
            size = await self._size(key)
            yield None if size is None else _Reader(size, None)
            return
        # Always a range, so that the answer's Content-Range gives the whole size.
        wanted = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with _translated(f"GET {key}"):
                response = await self._s3.get_object(
                    Bucket=self.settings.bucket, Key=key, Range=wanted
                )
        except _Absent:
            yield None
            return
        except _PastTheEnd:
            size = await self._size(key)
            yield None if size is None else _Reader(size, None)
            return
        body = response["Body"]
        try:
            total = response["ContentLength"]
            if "ContentRange" in response:  # "bytes 0-9/1234"
                total = int(response["ContentRange"].rpartition("/")[2])
            yield _Reader(total, body.iter_chunks(256 * 1024))
        finally:
            body.close()

    async def _size(self, key: str) -> int | None:
        try:
            with _translated(f"HEAD {key}"):
                head = await self._s3.head_object(Bucket=self.settings.bucket, Key=key)
        except _Absent:
            return None
        return head["ContentLength"]

    async def put_file(self, digest: Digest, path: Path) -> bool:
        key = self.blob_key(digest)
        size = path.stat().st_size
        if size <= self.settings.part_size:
            body = await asyncio.to_thread(path.read_bytes)
            if len(body) != size:
                raise StorageError(f"{path} changed while being stored")
            try:
                with _translated(f"PUT {key}"):
                    await self._s3.put_object(
                        Bucket=self.settings.bucket,
                        Key=key,
                        Body=body,
                        ContentType="application/octet-stream",
                        IfNoneMatch="*",
                    )
            except _Exists:
                return False
            return True
        # A big blob another replica stored already is not sent again.
        if await self.stat(digest) is not None:
            return False
        return await self._multipart(digest, path, size)

    async def _multipart(self, digest: Digest, path: Path, size: int) -> bool:
        key = self.blob_key(digest)
        bucket = self.settings.bucket
        part_size = max(self.settings.part_size, math.ceil(size / _MAX_PARTS / MiB) * MiB)
        with _translated(f"start upload {key}"):
            upload = await self._s3.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType="application/octet-stream"
            )
        upload_id = upload["UploadId"]
        room = asyncio.Semaphore(self.settings.parts_in_flight)

        async def send(number: int, offset: int) -> CompletedPartTypeDef:
            async with room:
                data = await asyncio.to_thread(_read_part, path, offset, part_size)
                if len(data) != min(part_size, size - offset):
                    raise StorageError(f"{path} changed while being stored")
                with _translated(f"upload part {number} of {key}"):
                    answer = await self._s3.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                    )
                return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(send(number, offset))
                        for number, offset in enumerate(range(0, size, part_size), start=1)
                    ]
            except BaseExceptionGroup as failed:
                # The first failure of a part (the others were cancelled because of it).
                raise failed.exceptions[0] from None
            parts = [task.result() for task in tasks]
            await self._complete(digest, upload_id, parts)
            return True
        except _Exists:
            await self._abort(key, upload_id)
            return False
        except BaseException:
            # Cancelled or failed: the parts sent so far must not linger. Shielded, so
            # that a second cancellation does not interrupt the abort.
            await asyncio.shield(self._abort(key, upload_id))
            raise

    async def _complete(
        self, digest: Digest, upload_id: str, parts: list[CompletedPartTypeDef]
    ) -> None:
        """Complete an upload whose every byte was sent, unless another writer completed
        the same key meanwhile (then ``_Exists``)."""
        key = self.blob_key(digest)
        async with self._claimed(digest):
            if await self._size(key) is not None:
                raise _Exists()
            with _translated(f"complete upload {key}"):
                await self._s3.complete_multipart_upload(
                    Bucket=self.settings.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )

    def streamed(self, digest: Digest, size: int | None) -> StreamedUpload:
        """An upload of the blob fed as its bytes pass by (``StreamedUpload``)."""
        return StreamedUpload(self, digest, size)

    @asynccontextmanager
    async def _claimed(self, digest: Digest) -> AsyncIterator[None]:
        """Be the only writer completing this blob's upload, for a moment.

        ``If-None-Match: *`` on CompleteMultipartUpload is not enough on SeaweedFS 4.48:
        16 racing completes of one key had 4 winners, while racing create-only PUTs have
        one (tests/test_storage_objects.py). So the completes take turns through a claim,
        an empty object made by a create-only PUT and removed after the complete. A claim
        left by a killed writer is taken over once older, by the store's clock, than
        ``claim_timeout``; ``abort_stale_uploads`` sweeps those nobody came back for.

        A claim held longer than ``claim_wait`` (its writer died, or its release failed
        with the store down) is not waited out: the blob is then someone else's to
        store (``_Exists`` when it is there, else ``StorageError``: not stored this
        time), so that a fill is never held for ``claim_timeout``.
        """
        bucket, key = self.settings.bucket, self.claim_key(digest)
        deadline = time.monotonic() + self.settings.claim_wait
        while True:
            try:
                with _translated(f"PUT {key}"):
                    await self._s3.put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
                break
            except _Exists:
                pass
            try:
                with _translated(f"HEAD {key}"):
                    head = await self._s3.head_object(Bucket=bucket, Key=key)
            except _Absent:
                head = None  # its holder is done: try again
            if head is not None:
                now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
                if (now - head["LastModified"]).total_seconds() > self.settings.claim_timeout:
                    with _translated(f"DELETE {key}"):
                        await self._s3.delete_object(Bucket=bucket, Key=key)
                    continue
            if time.monotonic() >= deadline:
                if await self._size(self.blob_key(digest)) is not None:
                    raise _Exists()
                raise StorageError(
                    f"PUT {key}: another writer has held the claim to complete {digest} for"
                    f" over {self.settings.claim_wait:g} s; not stored this time"
                )
            await asyncio.sleep(0.05)  # a complete takes a moment
        try:
            yield
        finally:
            await asyncio.shield(self._release(key))

    async def _release(self, key: str) -> None:
        try:
            with _translated(f"DELETE {key}"):
                await self._s3.delete_object(Bucket=self.settings.bucket, Key=key)
        except StorageError:
            pass  # taken over once stale

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            with _translated(f"abort upload {key}"):
                await self._s3.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=key, UploadId=upload_id
                )
        except StorageError:
            pass  # abort_stale_uploads() sweeps it later

    async def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        key = self.manifest_key(digest)
        try:
            with _translated(f"GET {key}"):
                response = await self._s3.get_object(Bucket=self.settings.bucket, Key=key)
                async with response["Body"] as body:
                    data = await body.read()
        except _Absent:
            return None
        return response.get("ContentType", "application/octet-stream"), data

    async def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        key = self.manifest_key(digest)
        # Overwriting is harmless: the key is the body's digest.
        with _translated(f"PUT {key}"):
            await self._s3.put_object(
                Bucket=self.settings.bucket, Key=key, Body=body, ContentType=media_type
            )

    async def delete(self, digest: Digest) -> None:
        for key in (self.blob_key(digest), self.manifest_key(digest)):
            with _translated(f"DELETE {key}"):
                await self._s3.delete_object(Bucket=self.settings.bucket, Key=key)

    # --- beyond the contract --------------------------------------------------------------------

    async def presign(self, digest: Digest, expires_seconds: int) -> str:
        """A URL any HTTP client can GET the blob from until it expires (for a 307)."""
        with _translated("presign"):
            return await self._s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.settings.bucket, "Key": self.blob_key(digest)},
                ExpiresIn=expires_seconds,
            )

    async def ping(self) -> None:
        """Raise ``StorageUnavailable`` (or ``StorageError``) unless the bucket answers."""
        try:
            with _translated(f"HEAD bucket {self.settings.bucket}"):
                await self._s3.head_bucket(Bucket=self.settings.bucket)
        except _Absent:
            raise StorageError(f"no bucket {self.settings.bucket!r}") from None

    async def abort_stale_uploads(self, older_than_seconds: float) -> int:
        """Abort multipart uploads under the prefix begun longer ago than that (those of
        fills killed mid-upload: S3 keeps their parts, and bills them, until aborted), and
        remove claims as old (of writers killed while completing). Returns how many."""
        cutoff = time.time() - older_than_seconds
        stale: list[tuple[str, str]] = []
        paginator = self._s3.get_paginator("list_multipart_uploads")
        with _translated("list uploads"):
            async for page in paginator.paginate(
                Bucket=self.settings.bucket, Prefix=self.settings.prefix
            ):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < cutoff:
                        stale.append((upload["Key"], upload["UploadId"]))
        for key, upload_id in stale:
            with _translated(f"abort upload {key}"):
                await self._s3.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=key, UploadId=upload_id
                )
        claims = []
        with _translated("list claims"):
            async for listing in self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=f"{self.settings.prefix}claims/"
            ):
                for entry in listing.get("Contents", []):
                    if entry["LastModified"].timestamp() < cutoff:
                        claims.append(entry["Key"])
        for key in claims:
            await self._release(key)
        return len(stale) + len(claims)

    async def iter_objects(self) -> AsyncIterator[StoredObject]:
        """Every blob and manifest in the bucket under the prefix (other keys are not ours)."""
        paginator = self._s3.get_paginator("list_objects_v2")
        prefix = self.settings.prefix
        with _translated("list objects"):
            async for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                for entry in page.get("Contents", []):
                    key = entry["Key"]
                    kind, _, rest = key.removeprefix(prefix).partition("/")
                    algorithm, _, hex_ = rest.partition("/")
                    if kind not in ("blobs", "manifests") or not hex_ or "/" in hex_:
                        continue
                    yield StoredObject(
                        key=key,
                        kind="blob" if kind == "blobs" else "manifest",
                        digest=Digest(algorithm, hex_),
                        size=entry["Size"],
                        modified=entry["LastModified"].timestamp(),
                    )


class StreamedUpload:
    """A blob put into the bucket as its bytes pass by, in parts sent as they fill.

    At most ``parts_in_flight`` parts are under way: a ``write`` that would need more is
    refused (False), and its caller gives the upload up rather than make its own reader
    wait for the bucket. The blob appears only by ``complete``, create-only, which the
    caller calls once it has verified every byte; ``abort`` leaves nothing behind.
    """

    def __init__(self, objects: S3Objects, digest: Digest, size: int | None) -> None:
        self._objects = objects
        self._digest = digest
        self._key = objects.blob_key(digest)
        least = objects.settings.part_size
        self._part_size = least if size is None else max(least, math.ceil(size / _MAX_PARTS))
        self._buffer = bytearray()
        self.written = 0  # bytes taken so far
        self._parts: list[asyncio.Task[CompletedPartTypeDef]] = []
        self._upload_id: str | None = None

    async def write(self, data: bytes) -> bool:
        """Take ``data``; False when the bucket lags behind or failed (then ``abort``)."""
        self._buffer += data
        self.written += len(data)
        while len(self._buffer) >= self._part_size:
            if any(part.done() and part.exception() for part in self._parts):
                return False
            if (
                sum(not part.done() for part in self._parts)
                >= self._objects.settings.parts_in_flight
            ):
                return False
            await self._send(bytes(self._buffer[: self._part_size]))
            del self._buffer[: self._part_size]
        return True

    async def _send(self, data: bytes) -> None:
        s3, bucket, key = self._objects._s3, self._objects.settings.bucket, self._key
        if self._upload_id is None:
            with _translated(f"start upload {key}"):
                upload = await s3.create_multipart_upload(
                    Bucket=bucket, Key=key, ContentType="application/octet-stream"
                )
            self._upload_id = upload["UploadId"]
        upload_id, number = self._upload_id, len(self._parts) + 1

        async def send() -> CompletedPartTypeDef:
            with _translated(f"upload part {number} of {key}"):
                answer = await s3.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
            return {"PartNumber": number, "ETag": answer["ETag"]}

        self._parts.append(asyncio.ensure_future(send()))

    async def complete(self) -> bool:
        """Send the rest and complete; False when the bucket had the blob already."""
        try:
            if self._buffer or not self._parts:
                await self._send(bytes(self._buffer))
                self._buffer.clear()
            parts = [await part for part in self._parts]
            assert self._upload_id is not None
            await self._objects._complete(self._digest, self._upload_id, parts)
        except _Exists:
            await self.abort()
            return False
        except BaseException:
            await asyncio.shield(self.abort())
            raise
        return True

    async def abort(self) -> None:
        for part in self._parts:
            part.cancel()
        await asyncio.gather(*self._parts, return_exceptions=True)
        if self._upload_id is not None:
            await self._objects._abort(self._key, self._upload_id)
            self._upload_id = None


def _read_part(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


class _Absent(Exception):
    """The key is not there (404): an answer, not a failure."""


class _Exists(Exception):
    """A create-only write found the key there already (412)."""


class _PastTheEnd(Exception):
    """A range starting at or after the object's end (416)."""


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """The library's errors as the contract's; ``what`` names the operation, never secrets."""
    import aiohttp  # loaded by the client already (see ``S3Objects.start``)

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code in _ABSENT_CODES or status == 404 and code != "NoSuchBucket":
            raise _Absent() from exc
        # 409: AWS's answer to a create-only write racing another one for the same key.
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            raise _Exists() from exc
        if code == "InvalidRange" or status == 416:
            raise _PastTheEnd() from exc
        if code in _FULL_CODES or status == 507:
            raise StorageFull(f"{what}: the object store is full ({code})") from exc
        if code in _UNAVAILABLE_CODES or status >= 500:
            raise StorageUnavailable(f"{what}: the object store answered {status} {code}") from exc
        raise StorageError(f"{what}: the object store refused: {status} {code}") from exc
    except (
        BotoConnectionError,
        HTTPClientError,
        aiohttp.ClientError,
        TimeoutError,
        OSError,
    ) as exc:
        raise StorageUnavailable(
            f"{what}: the object store is unreachable ({type(exc).__name__})"
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(f"{what}: {type(exc).__name__}") from exc
