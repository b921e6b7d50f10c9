"""End to end: warm a cache, carry it across as an OCI archive, serve it offline."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import SeededUpstream
from tests.support import skopeo
from tests.support.images import write_image
from tests.support.mirror import MirrorProcess, run_cli
from tests.support.registry import UpstreamRegistry

pytestmark = pytest.mark.e2e


def _config(mirror: MirrorProcess) -> list[str]:
    return ["--config", str(mirror.config_path)]


def test_warmed_images_are_pulled_without_upstream_blob_requests(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    upstream = seeded.registry
    with seeded.mirror() as mirror:
        mark = upstream.mark()
        warmed = run_cli("warm", "library/multi:1", "test:1", *_config(mirror))
        assert warmed.returncode == 0, warmed.stderr
        assert "2 images" in warmed.stdout
        expected = seeded.multi.total_size + seeded.single.total_size
        assert upstream.blob_bytes_sent(mark) == expected
        again = run_cli("warm", "library/multi:1", "test:1", *_config(mirror))
        assert again.returncode == 0 and "0 B fetched" in again.stdout, again.stdout
        mark = upstream.mark()
        skopeo.copy_to_dir(mirror.ref("library/multi:1"), tmp_path / "multi", all_platforms=True)
        skopeo.copy_to_dir(mirror.ref("library/test:1"), tmp_path / "test")
        assert upstream.blob_gets(mark) == []


def test_warm_can_take_one_platform_of_an_index(seeded: SeededUpstream, tmp_path: Path) -> None:
    upstream = seeded.registry
    arm = seeded.multi.platform("linux", "arm64")
    mirror = seeded.mirror(workdir=tmp_path / "mirror")
    mark = upstream.mark()
    result = run_cli("warm", "--platform", "linux/arm64", "library/multi:1", *_config(mirror))
    assert result.returncode == 0, result.stderr
    fetched = {e.reference for e in upstream.blob_gets(mark) if e.status == 200}
    assert fetched == set(arm.blob_digests)


def test_warm_reports_bad_and_missing_references_by_name(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    mirror = seeded.mirror(workdir=tmp_path / "mirror")
    bad = run_cli("warm", "Not A Ref", *_config(mirror))
    assert bad.returncode == 2
    assert "'Not A Ref' is not an image reference" in bad.stderr
    missing = run_cli("warm", "library/test:1", "library/nope:1", *_config(mirror))
    assert missing.returncode == 1
    assert "library/nope:1" in missing.stderr and "manifest unknown" in missing.stderr
    assert "1 images" in missing.stdout


def test_export_import_and_offline_serving(seeded: SeededUpstream, tmp_path: Path) -> None:
    image = write_image(tmp_path / "layout", "1", [30_000, 60_000], seed=11)
    archive = tmp_path / "carry.tar"
    with UpstreamRegistry(auth="token") as upstream:
        upstream.push_image(image, "library/island:1")
        upstream.push_image(seeded.multi, "library/multi:1")
        multi_digest = upstream.manifest_digest("library/multi", "1")
        connected = MirrorProcess(
            [{"name": "docker.io", "url": upstream.url}], workdir=tmp_path / "connected"
        )
        warmed = run_cli("warm", "island:1", "library/multi:1", *_config(connected))
        assert warmed.returncode == 0, warmed.stderr
        exported = run_cli(
            "export", "island:1", "library/multi:1", "-o", str(archive), *_config(connected)
        )
        assert exported.returncode == 0, exported.stderr
    # Other tools read the archive.
    ref = f"oci-archive:{archive}:docker.io/library/island:1"
    got = skopeo.copy_to_dir(ref, tmp_path / "read-back")
    assert got == image.manifest_digest
    with tarfile.open(archive) as tar:
        layout = tar.extractfile("oci-layout")
        assert layout is not None and json.load(layout)["imageLayoutVersion"] == "1.0.0"
    # The upstream is gone; a fresh cache on the far side imports and serves offline.
    island = MirrorProcess(
        [{"name": "docker.io", "url": "http://127.0.0.1:9"}],
        extra_args=("--offline",),
        workdir=tmp_path / "island",
    )
    imported = run_cli("import", str(archive), *_config(island))
    assert imported.returncode == 0, imported.stderr
    assert "imported docker.io/library/island:1" in imported.stdout
    with island:
        pulled = skopeo.copy_to_dir(island.ref("library/island:1"), tmp_path / "pulled-island")
        assert pulled == image.manifest_digest
        multi = skopeo.copy_to_dir(
            island.ref("library/multi:1"), tmp_path / "pulled-multi", all_platforms=True
        )
        assert multi == multi_digest
        missing = httpx.get(
            f"{island.url}/v2/library/elsewhere/manifests/1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert missing.status_code == 404
        error = missing.json()["errors"][0]
        assert error["code"] == "MANIFEST_UNKNOWN"
        assert "not cached and the mirror is offline" in error["message"]


def test_import_of_a_skopeo_archive_and_of_a_corrupt_one(
    seeded: SeededUpstream, tmp_path: Path
) -> None:
    image = write_image(tmp_path / "layout", "1", [20_000, 40_000], seed=12)
    good = tmp_path / "skopeo.tar"
    skopeo.copy(image.ref, f"oci-archive:{good}:docker.io/library/made:1")
    nowhere = [{"name": "docker.io", "url": "http://127.0.0.1:9"}]
    mirror = MirrorProcess(nowhere, workdir=tmp_path / "mirror")
    loaded = run_cli("import", str(good), *_config(mirror))
    assert loaded.returncode == 0, loaded.stderr
    # The same image with its second layer's bytes changed.
    bad_layer = image.layers[1].digest.split(":")[1]
    corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(good) as source, tarfile.open(corrupt, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member) if member.isfile() else None
            if member.name.endswith(bad_layer) and data is not None:
                payload = bytearray(data.read())
                payload[100] ^= 0xFF
                target.addfile(member, io.BytesIO(bytes(payload)))
            else:
                target.addfile(member, data)
    fresh = MirrorProcess(nowhere, workdir=tmp_path / "fresh")
    failed = run_cli("import", str(corrupt), *_config(fresh))
    assert failed.returncode == 1
    assert f"blob sha256:{bad_layer}: its bytes do not match its digest" in failed.stderr
    assert not list((fresh.cache_dir / "blobs").glob(f"**/{bad_layer}*"))
    with fresh:
        response = httpx.get(
            f"{fresh.url}/v2/library/made/manifests/1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert response.status_code != 200  # no tag for an image with a corrupt blob
    not_a_layout = run_cli("import", str(tmp_path / "layout" / "oci-layout"), *_config(fresh))
    assert not_a_layout.returncode == 1
    assert "not an OCI layout" in not_a_layout.stderr
