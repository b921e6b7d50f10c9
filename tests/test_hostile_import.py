"""``mirror import`` of hostile layouts: sizes that lie, files that never end, an
index too large to read, and a server starting during an import."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mirror.config import parse
from mirror.images import Descriptor
from mirror.layout import LayoutError, _copy_blob, import_layout
from mirror.reference import Digest, parse_digest
from mirror.service import PullThroughCache
from tests.support.images import write_image


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[PullThroughCache]:
    settings = parse(
        {
            "cache": {"directory": str(tmp_path / "cache"), "offline": True},
            "upstreams": [{"name": "docker.io", "url": "http://upstream.invalid"}],
        },
        environ={},
    )
    cache = PullThroughCache.from_settings(settings)
    yield cache
    cache.store.close()


def layer_file(layout: Path, digest: str) -> Path:
    algorithm, hex_ = digest.split(":")
    return layout / "blobs" / algorithm / hex_


def leftovers(cache: PullThroughCache) -> list[Path]:
    return list(cache.store.tmp_dir.iterdir())


def test_a_layer_larger_than_declared_stops_at_the_declared_size(
    tmp_path: Path, cache: PullThroughCache
) -> None:
    image = write_image(tmp_path / "layout", "1", [12], seed=1)
    layer = layer_file(tmp_path / "layout", image.layer_digests[0])
    with layer.open("r+b") as file:
        file.truncate(1024**3)  # sparse: 1 GiB that costs nothing on disk
    summary = import_layout(cache, tmp_path / "layout", "library/a")
    assert summary.images == []
    ((_, reason),) = summary.failures
    assert f"larger than the {image.layers[0].size} bytes declared" in reason
    assert leftovers(cache) == []
    assert not cache.store.has_blob(parse_digest(image.layer_digests[0]))


def test_a_layer_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, cache: PullThroughCache
) -> None:
    image = write_image(tmp_path / "layout", "1", [12], seed=1)
    layer = layer_file(tmp_path / "layout", image.layer_digests[0])
    layer.unlink()
    layer.symlink_to("/dev/zero")
    summary = import_layout(cache, tmp_path / "layout", "library/a")
    ((_, reason),) = summary.failures
    assert "not a regular file" in reason
    assert leftovers(cache) == []


def test_an_oversized_index_is_not_read_whole(tmp_path: Path, cache: PullThroughCache) -> None:
    write_image(tmp_path / "layout", "1", [12], seed=1)
    index = tmp_path / "layout" / "index.json"
    document = json.loads(index.read_text())
    document["annotations"] = {"padding": "x" * (5 * 1024 * 1024)}
    index.write_text(json.dumps(document))
    with pytest.raises(LayoutError, match="larger than"):
        import_layout(cache, tmp_path / "layout", "library/a")


def test_a_server_starting_during_an_import_leaves_its_files_alone(
    cache: PullThroughCache,
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = Digest.of(data)

    class Source:
        """A layout whose blob read is interrupted by a server starting up."""

        @contextmanager
        def open(self, name: str) -> Iterator[io.BytesIO]:
            store = cache.store

            class Stream(io.BytesIO):
                def read(self, size: int | None = -1) -> bytes:
                    if self.tell() > 0:
                        store.clean_temp()  # what `mirror serve` does as it starts
                    return super().read(size)

            yield Stream(data)

    descriptor = Descriptor("application/octet-stream", digest, len(data))
    assert _copy_blob(cache, Source(), descriptor) == len(data)  # type: ignore[arg-type]
    assert cache.store.has_blob(digest)
    assert leftovers(cache) == []
