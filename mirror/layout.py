"""OCI image layouts: ``mirror export`` writes cached images as one, ``mirror
import`` loads one (ours, or skopeo's ``oci-archive:``) into the cache.

Import verifies every digest before anything is cached, and records a tag only
once every manifest and blob of its image made it in.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .errors import ManifestInvalid, OCIError
from .images import Descriptor, children, is_index, referenced_blobs
from .manifest import MANIFEST_TYPES, OCI_INDEX, manifest_media_type
from .reference import Digest, ImageReference, parse_digest, parse_image_reference
from .referrers import index_body, referrers_tag
from .service import PullThroughCache
from .storage.locks import FileLock
from .upstream.client import Upstream

__all__ = ["LayoutError", "Plan", "export_layout", "import_layout", "plan_export"]

REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1024 * 1024
_MAX_INDEX_BYTES = 4 * 1024 * 1024
# Room left free on the cache's disk beyond the blob being imported.
_DISK_RESERVE = 64 * 1024 * 1024
# How long an import waits for a running mirror's fill of the same blob.
_LOCK_WAIT_SECONDS = 600.0


class LayoutError(Exception):
    """The layout or archive cannot be read, or an image in it is incomplete or corrupt."""


@dataclass
class Plan:
    """What an export writes: top-level descriptors, manifests and blob digests."""

    index: list[dict[str, object]] = field(default_factory=list)
    manifests: dict[Digest, bytes] = field(default_factory=dict)
    blobs: dict[Digest, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # uncached platforms of an index


def _ref_name(upstream: str, repository: str, reference: ImageReference) -> str:
    name = f"{upstream}/{repository}"
    return f"{name}@{reference.digest}" if reference.digest else f"{name}:{reference.tag}"


async def plan_export(cache: PullThroughCache, references: list[ImageReference]) -> Plan:
    """Resolve references from the cache alone (the cache should be offline)."""
    plan = Plan()
    for reference in references:
        upstream, repository = cache.route(reference.path_name)
        top = await cache.get_manifest(upstream, repository, reference.reference, MANIFEST_TYPES)
        images = [top.body]
        plan.manifests[top.digest] = top.body
        if is_index(top.media_type):
            images = []
            for child in children(top.body):
                try:
                    manifest = await cache.get_manifest(
                        upstream, repository, child.digest, MANIFEST_TYPES
                    )
                    blobs = referenced_blobs(manifest.body)
                except OCIError:
                    plan.skipped.append(f"{reference} {child.platform or child.digest}")
                    continue
                if not all(cache.store.has_blob(d.digest) for d in blobs):
                    plan.skipped.append(f"{reference} {child.platform or child.digest}")
                    continue
                plan.manifests[child.digest] = manifest.body
                images.append(manifest.body)
        for body in images:
            for blob in referenced_blobs(body):
                if not cache.store.has_blob(blob.digest):
                    raise LayoutError(f"{reference}: blob {blob.digest} is not cached")
                plan.blobs[blob.digest] = blob.size
        plan.index.append(
            {
                "mediaType": top.media_type,
                "digest": str(top.digest),
                "size": len(top.body),
                "annotations": {REF_NAME: _ref_name(upstream.name, repository, reference)},
            }
        )
        await _plan_referrers(cache, plan, upstream, repository, reference, top.digest)
    return plan


async def _plan_referrers(
    cache: PullThroughCache,
    plan: Plan,
    upstream: Upstream,
    repository: str,
    reference: ImageReference,
    subject: Digest,
) -> None:
    """The cached referrers of an image, written as its referrers tag (the spec's tag
    schema): import loads it like any tagged index, and offline serving reads it back."""
    answer = await cache.get_referrers(upstream, repository, subject, None)
    kept: list[dict[str, object]] = []
    for raw in answer.manifests:
        try:
            digest = parse_digest(str(raw.get("digest", "")))
            manifest = await cache.get_manifest(upstream, repository, digest, MANIFEST_TYPES)
            blobs = referenced_blobs(manifest.body)  # an index as referrer is not carried
        except OCIError:
            plan.skipped.append(f"{reference} referrer {raw.get('digest')}")
            continue
        if not all(cache.store.has_blob(b.digest) for b in blobs):
            plan.skipped.append(f"{reference} referrer {digest}")
            continue
        plan.manifests[digest] = manifest.body
        plan.blobs.update((b.digest, b.size) for b in blobs)
        kept.append(raw)
    if not kept:
        return
    body = index_body(kept)
    digest = Digest.of(body)
    plan.manifests[digest] = body
    name = f"{upstream.name}/{repository}:{referrers_tag(subject)}"
    plan.index.append(
        {
            "mediaType": OCI_INDEX,
            "digest": str(digest),
            "size": len(body),
            "annotations": {REF_NAME: name},
        }
    )


def _add(tar: tarfile.TarFile, name: str, size: int, source: IO[bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(time.time()), 0o644
    tar.addfile(info, source)


def export_layout(cache: PullThroughCache, plan: Plan, out: Path) -> None:
    """Write the plan as an OCI layout tar, atomically (temporary file, then rename)."""
    temp = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
            layout = b'{"imageLayoutVersion":"1.0.0"}'
            _add(tar, "oci-layout", len(layout), io.BytesIO(layout))
            index = json.dumps({"schemaVersion": 2, "manifests": plan.index}).encode()
            _add(tar, "index.json", len(index), io.BytesIO(index))
            for digest, body in plan.manifests.items():
                _add(tar, f"blobs/{digest.algorithm}/{digest.hex}", len(body), io.BytesIO(body))
            for digest, size in plan.blobs.items():
                handle = cache.store.open_blob(digest)
                if handle is None:
                    raise LayoutError(f"blob {digest} was evicted during the export")
                with handle:
                    _add(tar, f"blobs/{digest.algorithm}/{digest.hex}", size, handle)
        os.replace(temp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


class _Source:
    """An OCI layout as a directory or a tar archive."""

    def __init__(self, path: Path) -> None:
        self._dir: Path | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            self._dir = path
        else:
            try:
                self._tar = tarfile.open(path, "r:*")
            except (OSError, tarfile.TarError) as exc:
                reason = f"{path}: not an OCI layout directory or tar archive ({exc})"
                raise LayoutError(reason) from exc
            for member in self._tar.getmembers():
                if member.isfile():
                    self._members[member.name.removeprefix("./")] = member

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._dir is not None:
            try:
                file = (self._dir / name).open("rb")
            except FileNotFoundError:
                raise LayoutError(f"the layout has no {name}") from None
            with file:
                # A device or FIFO (a symlink to /dev/zero) never ends: refuse it.
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    raise LayoutError(f"{name} in the layout is not a regular file")
                yield file
            return
        assert self._tar is not None
        member = self._members.get(name)
        stream = self._tar.extractfile(member) if member else None
        if stream is None:
            raise LayoutError(f"the archive has no {name}")
        with stream:
            yield stream

    def has(self, name: str) -> bool:
        if self._dir is not None:
            return (self._dir / name).is_file()
        return name in self._members

    def read_verified(self, digest: Digest, limit: int = 4 * 1024 * 1024) -> bytes:
        with self.open(_blob_path(digest)) as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise LayoutError(f"manifest {digest} is larger than {limit} bytes")
        if Digest.of(data, digest.algorithm) != digest:
            raise LayoutError(f"manifest {digest}: its bytes do not match its digest")
        return data


def _blob_path(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


@dataclass
class ImportSummary:
    images: list[str] = field(default_factory=list)
    blobs_added: int = 0
    blobs_present: int = 0
    bytes_added: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def _copy_blob(cache: PullThroughCache, source: _Source, blob: Descriptor) -> int:
    """Copy one blob into the cache, verified; returns the bytes added (0 if present).

    It holds the digest's lock, as a fill does, and writes where a fill would: a
    running mirror then follows it instead of fetching, and leaves its file alone.
    """
    store = cache.store
    if store.has_blob(blob.digest):
        return 0
    lock = FileLock(store.lock_path(blob.digest))
    deadline = time.monotonic() + _LOCK_WAIT_SECONDS
    while not lock.try_acquire():  # a running mirror is filling it
        if time.monotonic() > deadline:
            raise LayoutError(f"blob {blob.digest} is being filled by a running mirror; retry")
        time.sleep(0.05)
    temp = store.temp_path(blob.digest)
    try:
        if store.has_blob(blob.digest):
            return 0
        lock.write_note(str(blob.size))
        free = shutil.disk_usage(store.tmp_dir).free
        if free < blob.size + _DISK_RESERVE:
            raise LayoutError(
                f"blob {blob.digest}: {blob.size} bytes do not fit ({free} bytes free)"
            )
        hasher = blob.digest.hasher()
        size = 0
        with source.open(_blob_path(blob.digest)) as stream, temp.open("wb") as out:
            # One byte past the declared size is enough to know it is wrong.
            while chunk := stream.read(min(_CHUNK, blob.size + 1 - size)):
                size += len(chunk)
                if size > blob.size:
                    raise LayoutError(
                        f"blob {blob.digest} is larger than the {blob.size} bytes declared"
                    )
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != blob.digest.hex or size != blob.size:
            raise LayoutError(f"blob {blob.digest}: its bytes do not match its digest")
        store.adopt_blob(temp, blob.digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        lock.release(remove=True)
    return size


def _image_reference(name: str | None, repository: str | None) -> ImageReference:
    if not name:
        raise LayoutError("an image in index.json has no org.opencontainers.image.ref.name")
    if "/" in name or "@" in name or repository is None:
        try:
            return parse_image_reference(name)
        except OCIError as exc:
            raise LayoutError(f"ref name {name!r} is not an image reference: {exc}") from exc
    # A bare tag, as `skopeo copy … oci-archive:FILE:TAG` writes it.
    return parse_image_reference(f"{repository}:{name}")


def import_layout(
    cache: PullThroughCache, path: Path, repository: str | None = None
) -> ImportSummary:
    """Load every named image of a layout; each failure is reported, not raised."""
    summary = ImportSummary()
    source = _Source(path)
    try:
        with source.open("index.json") as stream:
            raw = stream.read(_MAX_INDEX_BYTES + 1)
            if len(raw) > _MAX_INDEX_BYTES:
                raise LayoutError(f"index.json is larger than {_MAX_INDEX_BYTES} bytes")
            try:
                index = json.loads(raw)
                entries = index["manifests"]
                assert isinstance(entries, list)
            except (ValueError, KeyError, TypeError, AssertionError) as exc:
                raise LayoutError("index.json is not an OCI image index") from exc
        for entry in entries:
            name = (
                (entry.get("annotations") or {}).get(REF_NAME) if isinstance(entry, dict) else None
            )
            try:
                reference = _image_reference(name, repository)
                _import_image(cache, source, entry, reference, summary)
                summary.images.append(str(reference))
            except (LayoutError, OCIError, ValueError) as exc:
                summary.failures.append((str(name), str(exc)))
    finally:
        source.close()
    return summary


def _import_image(
    cache: PullThroughCache,
    source: _Source,
    entry: dict[str, object],
    reference: ImageReference,
    summary: ImportSummary,
) -> None:
    upstream, repository_name = cache.route(reference.path_name)
    top_digest = parse_digest(str(entry.get("digest", "")))
    if reference.digest is not None and reference.digest != top_digest:
        raise LayoutError(f"{reference} names a different digest than index.json")
    manifests: dict[Digest, tuple[str, bytes]] = {}
    top_body = source.read_verified(top_digest)
    top_type = manifest_media_type(str(entry.get("mediaType") or ""), top_body)
    manifests[top_digest] = (top_type, top_body)
    images = [top_body]
    if is_index(top_type):
        images = []
        for child in children(top_body):
            if not source.has(_blob_path(child.digest)):
                continue  # a platform the layout does not carry
            body = source.read_verified(child.digest)
            manifests[child.digest] = (manifest_media_type(child.media_type, body), body)
            images.append(body)
        if not images:
            raise ManifestInvalid(f"{reference}: the layout holds none of the index's platforms")
    for body in images:
        for blob in referenced_blobs(body):
            added = _copy_blob(cache, source, blob)
            summary.blobs_added += bool(added)
            summary.blobs_present += not added
            summary.bytes_added += added
    # Every blob is in: now the manifests, and last the tag that makes them reachable.
    store = cache.store
    for digest, (media_type, body) in manifests.items():
        store.put_manifest(digest, media_type, body)
        cache.holdings.note_manifest_now(upstream.name, repository_name, digest, body)
    if reference.tag is not None and reference.digest is None:
        store.put_tag(
            upstream.name, repository_name, reference.tag, MANIFEST_TYPES, top_digest, top_type
        )
    store.add_repository(cache.catalog_name(upstream, repository_name))
