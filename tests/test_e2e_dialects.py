"""End to end: skopeo pulls through ``mirror serve`` from an upstream speaking an auth dialect.

The upstream (127.0.0.1) challenges with a Bearer line and a Basic line, its token realm
carries a query string of its own that its token service insists on, a missing or private
repository answers 401 ``insufficient_scope`` as Docker Hub's does, and blob GETs redirect to
blob storage on another host (127.0.0.2).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import skopeo
from tests.support.dialects import BlobStorage, DialectRegistry
from tests.support.hosts import AppServer
from tests.support.images import write_image
from tests.support.mirror import MirrorProcess

pytestmark = pytest.mark.e2e

PASSWORD = "e2e-upstream-password"


def test_skopeo_pulls_from_a_registry_with_an_auth_dialect(tmp_path: Path) -> None:
    registry = DialectRegistry(
        users={"alice": PASSWORD},
        challenge="two-lines",
        realm_query="tenant=acme",
        private={"team/private"},
    )
    storage = BlobStorage(registry.blobs)
    public = write_image(tmp_path / "public", "1", [4096, 100_000], seed=21)
    private = write_image(tmp_path / "private", "1", [2048], seed=22)
    registry.add_layout("team/app", "1", public.layout_dir)
    registry.add_layout("team/private", "1", private.layout_dir)
    with (
        AppServer(storage.app, "127.0.0.2") as cdn,
        AppServer(registry.app, "127.0.0.1") as upstream,
    ):
        registry.url, registry.blob_storage = upstream.url, cdn.url
        entry = {"name": "reg.test", "url": upstream.url, "retries": 1}
        entry.update(username_env="UPSTREAM_USER", password_env="UPSTREAM_PASSWORD")
        env = {"UPSTREAM_USER": "alice", "UPSTREAM_PASSWORD": PASSWORD}
        with MirrorProcess([entry], env=env, workdir=tmp_path / "mirror") as mirror:
            pulled = skopeo.copy_to_dir(mirror.ref("team/app:1"), tmp_path / "app")
            pulled_private = skopeo.copy_to_dir(mirror.ref("team/private:1"), tmp_path / "priv")
            with pytest.raises(skopeo.SkopeoError) as missing:
                skopeo.copy_to_dir(mirror.ref("team/missing:1"), tmp_path / "missing")
        log = mirror.log()  # stopped: every access line is written by now
    assert pulled == public.manifest_digest
    assert pulled_private == private.manifest_digest
    assert "manifest unknown" in missing.value.stderr.lower()
    assert '"GET /v2/team/missing/manifests/1" 404' in log
    assert " 401 " not in log and " 503 " not in log
    assert all("tenant=acme" in query for query in registry.token_requests)
    assert storage.recorder.seen and not any(s.carries_secrets for s in storage.recorder.seen)
    assert PASSWORD not in log
