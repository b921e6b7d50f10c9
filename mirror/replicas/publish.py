"""``mirror import`` with a replica's config: what the import put into this machine's
cache goes on into the replicas' bucket and shared records, so that every replica
serves it (the import itself reads and verifies the layout into the local cache).

For each imported image: its blobs and manifests into the bucket (create-only, as
fills store them), then the repository's holdings, and last the tag record in Redis,
which makes the rest reachable, as the import orders it locally.
"""

from __future__ import annotations

from ..errors import OCIError
from ..holdings import references
from ..images import children, is_index, referenced_blobs
from ..manifest import MANIFEST_TYPES
from ..reference import Digest, parse_image_reference
from ..service import PullThroughCache
from ..storage.base import StorageError

__all__ = ["publish"]


async def publish(cache: PullThroughCache, images: list[str]) -> list[tuple[str, str]]:
    """Share the imported ``images`` (references) with the fleet; the failures."""
    fleet, shared = cache.fleet, cache.shared
    assert fleet is not None and shared is not None
    failures: list[tuple[str, str]] = []
    await cache.start()
    try:
        for text in images:
            try:
                await _publish_one(cache, text)
            except (OCIError, StorageError, LookupError) as exc:
                failures.append((text, f"imported here, not shared with the replicas: {exc}"))
    finally:
        await cache.aclose()
    return failures


async def _publish_one(cache: PullThroughCache, text: str) -> None:
    fleet, shared, store = cache.fleet, cache.shared, cache.store
    assert fleet is not None and shared is not None
    reference = parse_image_reference(text)
    upstream, repository = cache.route(reference.path_name)
    if reference.digest is not None:
        top = reference.digest
    else:
        assert reference.tag is not None
        record = store.get_tag(upstream.name, repository, reference.tag, MANIFEST_TYPES)
        if record is None:
            raise LookupError(f"no tag record for {text}")
        top = record.digest
    manifests: dict[Digest, tuple[str, bytes]] = {}
    todo = [top]
    while todo:
        digest = todo.pop()
        found = store.get_manifest(digest)
        if found is None or digest in manifests:
            continue  # a platform the layout did not carry
        manifests[digest] = found
        media_type, body = found
        if is_index(media_type):
            todo += [child.digest for child in children(body)]
            continue
        for blob in referenced_blobs(body):
            handle = store.open_blob(blob.digest)
            if handle is None:
                raise LookupError(f"blob {blob.digest} is not in the local cache")
            with handle:
                await fleet.put(blob.digest, handle)
            if await fleet.size(blob.digest) is None:
                raise StorageError(f"blob {blob.digest} could not be put into the bucket")
    for digest, (media_type, body) in manifests.items():
        await shared.in_bucket(lambda: shared.objects.put_manifest(digest, media_type, body))  # noqa: B023
        await shared.stored(digest, len(body))
        listed, blobs = references(body)
        await shared.records.note_manifest(upstream.name, repository, digest, listed + blobs)
    if reference.digest is None:
        assert reference.tag is not None
        media_type = manifests[top][0]
        await cache.records.put_tag(
            upstream.name, repository, reference.tag, MANIFEST_TYPES, top, media_type
        )
    await cache.records.add_repository(cache.catalog_name(upstream, repository))
