"""Pure-Python writer of OCI image layouts (no external tools).

Layers are gzip-compressed tar archives holding one file of seeded pseudo-random (incompressible)
data.  The data comes from AES-CTR keyed by the seed, so it is deterministic (same seed, same
digests, run after run) and is generated at several GB/s.  Layers are written streaming: a 1 GiB
layer never sits in memory.  The gzip stream uses deflate level 0 ("stored" blocks) by default:
a perfectly valid gzip that costs no CPU (random data does not compress anyway).

Layer data depends on ``(seed, layer index)`` only, so two images written with the same seed
share their layer blobs (useful for cross-repository deduplication tests); the config differs
by tag/platform and carries the seed in a label.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "ALL_MANIFEST_TYPES",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "ImageInfo",
    "IndexInfo",
    "LayerInfo",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "write_image",
    "write_index",
]

OCI_LAYOUT_VERSION = "1.0.0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
#: Every manifest media type, for an ``Accept`` header that accepts anything.
ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
_TAR_BLOCK = tarfile.BLOCKSIZE  # 512
_TAR_RECORD = tarfile.RECORDSIZE  # 10240
_MTIME = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"

DEFAULT_PLATFORMS: tuple[tuple[str, str], ...] = (("linux", "amd64"), ("linux", "arm64"))


@dataclass(frozen=True)
class LayerInfo:
    """One layer blob as written into the layout."""

    digest: str  #: ``sha256:…`` of the compressed blob (what registries serve)
    size: int  #: size of the compressed blob in bytes
    diff_id: str  #: ``sha256:…`` of the uncompressed tar
    uncompressed_size: int  #: size of the uncompressed tar
    content_size: int  #: size of the single file's payload inside the tar (the requested size)


@dataclass(frozen=True)
class ImageInfo:
    """A single-platform image (OCI manifest) written into a layout."""

    layout_dir: Path
    tag: str | None  #: ``None`` for the per-platform members of an index
    os: str
    architecture: str
    manifest_digest: str
    manifest_size: int
    manifest_media_type: str
    config_digest: str
    config_size: int
    layers: tuple[LayerInfo, ...]

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def blob_digests(self) -> list[str]:
        """Config digest followed by the layer digests: every blob a full pull fetches."""
        return [self.config_digest, *self.layer_digests]

    @property
    def layers_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def total_size(self) -> int:
        """Bytes of all blobs (config + compressed layers) a pull transfers; no manifest."""
        return self.config_size + self.layers_size

    @property
    def blob_sizes(self) -> dict[str, int]:
        sizes = {layer.digest: layer.size for layer in self.layers}
        sizes[self.config_digest] = self.config_size
        return sizes

    @property
    def ref(self) -> str:
        """skopeo source reference, ``oci:DIR:TAG``."""
        if self.tag is None:
            raise ValueError("this image has no tag of its own (it is a member of an index)")
        return f"oci:{self.layout_dir}:{self.tag}"


@dataclass(frozen=True)
class IndexInfo:
    """A multi-platform image (OCI image index) written into a layout."""

    layout_dir: Path
    tag: str
    index_digest: str
    index_size: int
    images: tuple[ImageInfo, ...] = field(default_factory=tuple)

    @property
    def manifest_digest(self) -> str:
        """Alias of :attr:`index_digest` (the digest the tag resolves to)."""
        return self.index_digest

    @property
    def total_size(self) -> int:
        """Bytes of all blobs of all platforms (shared blobs counted once)."""
        return sum(self.blob_sizes.values())

    @property
    def blob_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for image in self.images:
            sizes.update(image.blob_sizes)
        return sizes

    def platform(self, os_: str, architecture: str) -> ImageInfo:
        for image in self.images:
            if image.os == os_ and image.architecture == architecture:
                return image
        raise KeyError(f"{os_}/{architecture}")

    @property
    def ref(self) -> str:
        return f"oci:{self.layout_dir}:{self.tag}"


class _HashingFile:
    """Write-only file wrapper hashing what goes through it."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sha.update(data)
        self.size += len(data)
        self._fh.write(data)


class _BlobWriter:
    """Streams a blob into ``blobs/sha256`` under a temporary name, renamed to its digest."""

    def __init__(self, layout_dir: Path) -> None:
        self._dir = layout_dir / "blobs" / "sha256"
        self._dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".tmp-")
        self._tmp = Path(tmp)
        self._raw = os.fdopen(fd, "wb", buffering=0)
        self.out = _HashingFile(self._raw)

    def commit(self) -> tuple[str, int]:
        self._raw.close()
        digest = "sha256:" + self.out.sha.hexdigest()
        final = self._dir / self.out.sha.hexdigest()
        os.replace(self._tmp, final)  # identical content if it already existed
        return digest, self.out.size

    def abort(self) -> None:
        self._raw.close()
        self._tmp.unlink(missing_ok=True)


def _write_bytes_blob(layout_dir: Path, data: bytes) -> tuple[str, int]:
    writer = _BlobWriter(layout_dir)
    try:
        writer.out.write(data)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _keystream(key_material: str) -> Any:
    key = hashlib.sha256(key_material.encode()).digest()
    return Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()


def _write_layer(
    layout_dir: Path, size: int, key_material: str, file_name: str, compresslevel: int
) -> LayerInfo:
    if size < 0:
        raise ValueError("layer size must be >= 0")
    info = tarfile.TarInfo(file_name)
    info.size = size
    info.mode = 0o644
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")

    writer = _BlobWriter(layout_dir)
    try:
        diff = hashlib.sha256()
        deflate = zlib.compressobj(compresslevel, zlib.DEFLATED, -zlib.MAX_WBITS)
        crc = 0
        tar_size = 0
        # gzip member header: magic, CM=deflate, no flags, mtime 0, XFL 0, OS unknown.
        writer.out.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff")

        def feed(chunk: bytes | bytearray | memoryview) -> None:
            nonlocal crc, tar_size
            diff.update(chunk)
            crc = zlib.crc32(chunk, crc)
            tar_size += len(chunk)
            out = deflate.compress(chunk)
            if out:
                writer.out.write(out)

        feed(header)
        stream = _keystream(key_material)
        zeros = bytes(_CHUNK)
        buf = bytearray(_CHUNK + 15)  # update_into needs block_size - 1 bytes of slack
        remaining = size
        while remaining > 0:
            n = min(remaining, _CHUNK)
            written = stream.update_into(zeros[:n] if n < _CHUNK else zeros, buf)
            feed(memoryview(buf)[:written])
            remaining -= written
        padding = -size % _TAR_BLOCK
        end = bytes(padding + 2 * _TAR_BLOCK)
        total = tar_size + len(end)
        end += bytes(-total % _TAR_RECORD)
        feed(end)
        writer.out.write(deflate.flush())
        writer.out.write(struct.pack("<II", crc & 0xFFFFFFFF, tar_size & 0xFFFFFFFF))
    except BaseException:
        writer.abort()
        raise
    digest, blob_size = writer.commit()
    return LayerInfo(
        digest=digest,
        size=blob_size,
        diff_id="sha256:" + diff.hexdigest(),
        uncompressed_size=tar_size,
        content_size=size,
    )


def _descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _write_single(
    layout_dir: Path,
    *,
    tag: str | None,
    layers: Sequence[int],
    seed: int,
    key_prefix: str,
    arch: str,
    os_: str,
    compresslevel: int,
) -> ImageInfo:
    layer_infos = tuple(
        _write_layer(
            layout_dir,
            size,
            f"mirror-test-layer:{key_prefix}:{i}",
            f"data/layer-{key_prefix.replace('/', '-')}-{i}.bin",
            compresslevel,
        )
        for i, size in enumerate(layers)
    )
    config = {
        "architecture": arch,
        "os": os_,
        "created": _CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"mirror.test.seed": str(seed), "mirror.test.tag": tag or ""},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layer_infos]},
        "history": [
            {"created": _CREATED, "created_by": f"mirror tests: layer {i}"}
            for i in range(len(layer_infos))
        ],
    }
    config_digest, config_size = _write_bytes_blob(layout_dir, _json_bytes(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config_digest, config_size),
        "layers": [_descriptor(OCI_LAYER_GZIP, lay.digest, lay.size) for lay in layer_infos],
    }
    manifest_digest, manifest_size = _write_bytes_blob(layout_dir, _json_bytes(manifest))
    return ImageInfo(
        layout_dir=layout_dir,
        tag=tag,
        os=os_,
        architecture=arch,
        manifest_digest=manifest_digest,
        manifest_size=manifest_size,
        manifest_media_type=OCI_MANIFEST,
        config_digest=config_digest,
        config_size=config_size,
        layers=layer_infos,
    )


def _init_layout(layout_dir: Path) -> None:
    layout_dir.mkdir(parents=True, exist_ok=True)
    (layout_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}))


def _tag_in_layout(layout_dir: Path, tag: str, descriptor: dict[str, Any]) -> None:
    """Add (or replace) ``tag`` in the layout's ``index.json``."""
    index_path = layout_dir / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    manifests = [
        m
        for m in index.get("manifests", [])
        if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ]
    entry = dict(descriptor)
    entry["annotations"] = {REF_NAME_ANNOTATION: tag}
    manifests.append(entry)
    index["manifests"] = manifests
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, index_path)


def write_image(
    layout_dir: str | os.PathLike[str],
    tag: str,
    layers: Sequence[int],
    seed: int,
    arch: str = "amd64",
    os: str = "linux",  # the brief's parameter name (shadows the module here)
    *,
    compresslevel: int = 0,
) -> ImageInfo:
    """Write a single-platform image tagged ``tag`` into the OCI layout ``layout_dir``.

    ``layers`` are the payload sizes in bytes (one file per layer).  The layout may already hold
    other tags: they are kept (an existing ``tag`` is replaced).  Push it with
    ``skopeo copy oci:DIR:TAG docker://…`` (see :attr:`ImageInfo.ref`).
    """
    path = Path(layout_dir)
    _init_layout(path)
    info = _write_single(
        path,
        tag=tag,
        layers=layers,
        seed=seed,
        key_prefix=str(seed),
        arch=arch,
        os_=os,
        compresslevel=compresslevel,
    )
    _tag_in_layout(
        path, tag, _descriptor(info.manifest_media_type, info.manifest_digest, info.manifest_size)
    )
    return info


def write_index(
    layout_dir: str | os.PathLike[str],
    tag: str,
    platforms: Sequence[tuple[str, str]] = DEFAULT_PLATFORMS,
    layers: Sequence[int] = (1024, 4096),
    seed: int = 0,
    *,
    compresslevel: int = 0,
) -> IndexInfo:
    """Write a multi-platform OCI image index tagged ``tag`` into ``layout_dir``.

    ``platforms`` are ``(os, architecture)`` pairs; every platform gets its own manifest, config
    and layers (layer data is seeded by ``seed`` *and* the platform, so platforms share no
    blobs).  Push it with ``skopeo copy --all``.
    """
    path = Path(layout_dir)
    _init_layout(path)
    images = tuple(
        _write_single(
            path,
            tag=None,
            layers=layers,
            seed=seed,
            key_prefix=f"{seed}/{os_}/{arch}",
            arch=arch,
            os_=os_,
            compresslevel=compresslevel,
        )
        for os_, arch in platforms
    )
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            _descriptor(
                image.manifest_media_type,
                image.manifest_digest,
                image.manifest_size,
                platform={"architecture": image.architecture, "os": image.os},
            )
            for image in images
        ],
    }
    index_digest, index_size = _write_bytes_blob(path, _json_bytes(index))
    _tag_in_layout(path, tag, _descriptor(OCI_INDEX, index_digest, index_size))
    return IndexInfo(
        layout_dir=path,
        tag=tag,
        index_digest=index_digest,
        index_size=index_size,
        images=images,
    )
