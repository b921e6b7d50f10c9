"""What is cached, purging, pinning and verify, through the admin API of the real app
(in process) in front of the fake upstream, counting what goes upstream again."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings, parse
from mirror.web.app import create_app
from tests.conftest import Clock, app_client, make_settings
from tests.fakes import FakeRegistry
from tests.support.htpasswd import basic, write_htpasswd
from tests.support.pulls import ACCEPT, image_size, pull

pytestmark = pytest.mark.anyio


@pytest.fixture
async def admin(
    settings: Settings, fake: FakeRegistry, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as http:
        yield http


async def test_ls_lists_exactly_the_pulled_images_with_their_sizes(
    admin: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    base = os.urandom(3000)
    a, _ = fake.add_image("library/a", "1", [base, os.urandom(5000)])
    b, _ = fake.add_image("acme/b", "2", [base, os.urandom(7000)])
    fake.add_image("library/never", "1", [os.urandom(10)])
    await pull(admin, "a", "1")
    await pull(admin, "acme/b", "2")
    await pull(admin, "acme/b", "2")

    listing = (await admin.get("/admin/repositories")).json()
    rows = {r["name"]: r for r in listing["repositories"]}
    assert list(rows) == ["docker.io/acme/b", "docker.io/library/a"]
    assert rows["docker.io/library/a"]["size"] == image_size(fake, a)
    assert rows["docker.io/acme/b"]["size"] == image_size(fake, b)
    assert rows["docker.io/acme/b"]["pulls"] == 2
    assert listing["next"] is None

    page = (await admin.get("/admin/repositories", params={"n": "1"})).json()
    assert [r["name"] for r in page["repositories"]] == ["docker.io/acme/b"]
    rest = (await admin.get("/admin/repositories", params={"last": page["next"]})).json()
    assert [r["name"] for r in rest["repositories"]] == ["docker.io/library/a"]
    only = (await admin.get("/admin/repositories", params={"prefix": "docker.io/library/"})).json()
    assert [r["name"] for r in only["repositories"]] == ["docker.io/library/a"]

    tags = (await admin.get("/admin/tags", params={"repository": "a"})).json()["tags"]
    assert [(t["tag"], t["digest"], t["size"]) for t in tags] == [("1", a, image_size(fake, a))]

    image = (await admin.get("/admin/image", params={"ref": "acme/b:2"})).json()
    assert image["digest"] == b
    assert image["size"] == image_size(fake, b)
    assert all(part["cached"] for part in image["blobs"]) and len(image["blobs"]) == 3
    assert image["tags"][0]["upstream"] == "docker.io"

    blobs = (await admin.get("/admin/blobs")).json()["blobs"]
    assert len(blobs) == 4  # the configs (alike), the shared base, two own layers

    missing = await admin.get("/admin/image", params={"ref": "library/never:1"})
    assert missing.status_code == 404
    bad = await admin.get("/admin/image", params={"ref": "Not A Ref"})
    assert bad.status_code == 400


async def test_purge_of_a_tag_frees_its_own_blobs_and_the_next_pull_fetches_them(
    admin: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    base = os.urandom(3000)
    own = os.urandom(5000)
    fake.add_image("library/a", "1", [base, own])
    fake.add_image("library/b", "1", [base])  # one layer: its own config
    await pull(admin, "a", "1")
    await pull(admin, "b", "1")
    blobs_before = fake.count("GET", "blob")

    purged = await admin.post("/admin/purge", json={"kind": "tag", "ref": "a:1"})
    assert purged.status_code == 200, purged.text
    result = purged.json()
    assert (result["tags"], result["manifests"], result["blobs"]) == (1, 1, 2)  # config, own
    assert result["freed"] >= len(own)
    names = [r["name"] for r in (await admin.get("/admin/repositories")).json()["repositories"]]
    assert names == ["docker.io/library/b"]

    manifests_before = fake.count("GET", "manifest")
    await pull(admin, "a", "1")
    assert fake.count("GET", "manifest") == manifests_before + 1
    assert fake.count("GET", "blob") == blobs_before + 2  # the shared base stayed
    metrics = (await admin.get("/metrics")).text
    assert 'mirror_admin_actions_total{action="purge",outcome="done"} 1.0' in metrics

    gone = await admin.post("/admin/purge", json={"kind": "tag", "ref": "zzz:1"})
    assert gone.status_code == 404
    nonsense = await admin.post("/admin/purge", json={"kind": "everything"})
    assert nonsense.status_code == 400
    not_json = await admin.post("/admin/purge", content=b"{")
    assert not_json.status_code == 400


async def test_purge_by_repository_upstream_digest_and_age(
    admin: httpx.AsyncClient, fake: FakeRegistry, settings: Settings
) -> None:
    fake.add_image("library/a", "1", [os.urandom(100)])
    fake.add_image("library/a", "2", [os.urandom(100)])
    fake.add_image("library/b", "1", [os.urandom(100)])
    for name, tag in (("a", "1"), ("a", "2"), ("b", "1")):
        await pull(admin, name, tag)
    result = (await admin.post("/admin/purge", json={"kind": "repository", "ref": "a"})).json()
    assert result["tags"] == 2
    blob = (await admin.get("/admin/blobs")).json()["blobs"][0]["digest"]
    one = (await admin.post("/admin/purge", json={"kind": "digest", "ref": blob})).json()
    assert one["blobs"] == 1 and one["freed"] > 0
    # What is left was last used two hours ago (diskcache keeps the wall clock).
    with sqlite3.connect(settings.cache.directory / "cache.db") as db:
        db.execute("UPDATE Cache SET access_time = access_time - 7200")
    await pull(admin, "a", "1")  # used now
    aged = (await admin.post("/admin/purge", json={"kind": "age", "age": "30m"})).json()
    assert aged["tags"] == 1 and aged["manifests"] == 1
    names = [r["name"] for r in (await admin.get("/admin/repositories")).json()["repositories"]]
    assert names == ["docker.io/library/a"]
    await admin.post("/admin/purge", json={"kind": "upstream", "ref": "docker.io"})
    everything = await admin.post("/admin/purge", json={"kind": "upstream", "ref": "docker.io"})
    assert everything.status_code == 404  # nothing left
    assert (await admin.get("/admin/repositories")).json()["repositories"] == []


async def test_a_pinned_image_survives_a_fill_that_evicts_everything_else(
    tmp_path: Path, fake: FakeRegistry, clock: Clock
) -> None:
    settings = make_settings(tmp_path)
    small = replace(
        settings, cache=replace(settings.cache, max_size=3 * 1024 * 1024, max_blob_share=1.0)
    )
    fake.add_image("library/keep", "1", [os.urandom(1024 * 1024)])
    for i in range(3):
        fake.add_image(f"library/other{i}", "1", [os.urandom(1024 * 1024)])
    app = create_app(small, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(app) as admin:
        await pull(admin, "keep", "1")
        pinned = await admin.post("/admin/pins", json={"ref": "keep:1"})
        assert pinned.status_code == 200, pinned.text
        for i in range(3):
            await pull(admin, f"other{i}", "1")
        names = [r["name"] for r in (await admin.get("/admin/repositories")).json()["repositories"]]
        assert "docker.io/library/keep" in names
        assert "docker.io/library/other0" not in names  # evicted
        before = fake.total
        await pull(admin, "keep", "1")
        assert fake.total == before  # every byte of it from the cache
        pins = (await admin.get("/admin/pins")).json()["pins"]
        assert [p["repository"] for p in pins] == ["library/keep"]

        unpinned = await admin.delete("/admin/pins", params={"ref": "keep:1"})
        assert unpinned.status_code == 200
        assert (await admin.get("/admin/pins")).json()["pins"] == []
        never = await admin.post("/admin/pins", json={"ref": "notcached:1"})
        assert never.status_code == 404


async def test_verify_drops_a_corrupted_blob_and_the_next_pull_fetches_it_again(
    admin: httpx.AsyncClient, fake: FakeRegistry, settings: Settings
) -> None:
    layer = os.urandom(4000)
    fake.add_image("library/a", "1", [layer])
    await pull(admin, "a", "1")
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    with sqlite3.connect(settings.cache.directory / "cache.db") as db:
        (filename,) = db.execute(
            "SELECT filename FROM Cache WHERE key = ?", (f"blob:{digest}",)
        ).fetchone()
    path = settings.cache.directory / filename
    path.write_bytes(b"rot" + path.read_bytes()[3:])

    started = await admin.post("/admin/verify", json={"rate": "1GiB"})
    assert started.status_code == 202
    report = started.json()
    while not report["done"]:
        await asyncio.sleep(0.01)
        report = (await admin.get("/admin/verify")).json()
    assert report["done"] and report["corrupt"] == [f"blob:{digest}"]
    assert report["checked"] == 3  # manifest, config, layer

    before = fake.count("GET", "blob")
    response = await admin.get(f"/v2/library/a/blobs/{digest}")
    assert response.content == layer
    assert fake.count("GET", "blob") == before + 1


async def test_only_admins_may_use_the_admin_api_and_each_action_is_logged(
    tmp_path: Path, fake: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"alice": "alice-pw", "bob": "bob-pw"})
    entry = {"name": "docker.io", "url": "http://upstream.fake", "retries": 0}
    settings = parse(
        {
            "cache": {"directory": str(tmp_path / "cache")},
            "upstreams": [entry],
            "auth": {"htpasswd": str(htpasswd), "admins": ["alice"], "tokens": True},
        },
        environ={},
    )
    fake.add_image("library/a", "1", [b"layer"])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with app_client(app) as client:
        anonymous = await client.get("/admin/repositories")
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")  # a browser answers it
        assert (await client.get("/ui")).status_code == 401
        bob = await client.get("/admin/repositories", headers=basic("bob", "bob-pw"))
        assert bob.status_code == 403
        wrong = await client.get("/admin/repositories", headers=basic("alice", "nope"))
        assert wrong.status_code == 401
        alice = basic("alice", "alice-pw")
        assert (await client.get("/admin/repositories", headers=alice)).status_code == 200
        response = await client.get("/v2/library/a/manifests/1", headers={**ACCEPT, **alice})
        assert response.status_code == 200
        with caplog.at_level("INFO", logger="mirror.admin"):
            purged = await client.post(
                "/admin/purge", json={"kind": "repository", "ref": "a"}, headers=alice
            )
        assert purged.status_code == 200
        assert "admin alice purged repository a: 1 tags, 1 manifests" in caplog.text


async def test_without_auth_only_clients_on_this_host_reach_the_admin_api(
    settings: Settings, fake: FakeRegistry
) -> None:
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    remote = httpx.ASGITransport(app, client=("192.0.2.7", 40000))
    async with (
        app_client(app) as local,
        httpx.AsyncClient(transport=remote, base_url="http://mirror") as other,
    ):
        assert (await local.get("/admin/status")).status_code == 200
        assert (await other.get("/admin/status")).status_code == 403
        assert (
            await other.post("/admin/purge", json={"kind": "age", "age": "0s"})
        ).status_code == 403
        assert (await other.get("/v2/")).status_code == 200  # pulls are for anyone


async def test_a_purge_reaches_what_other_workers_hold_in_memory(
    settings: Settings, fake: FakeRegistry, clock: Clock
) -> None:
    first, _ = fake.add_image("library/a", "1", [b"one"])
    worker = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    other = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with app_client(worker) as one, app_client(other) as two:
        await pull(one, "a", "1")  # the tag and manifest now in this worker's memory
        second, _ = fake.add_image("library/a", "1", [b"two"])  # the tag moved upstream
        assert (await two.post("/admin/purge", json={"kind": "tag", "ref": "a:1"})).is_success
        response = await one.get("/v2/library/a/manifests/1", headers=ACCEPT)
        assert response.headers["Docker-Content-Digest"] == second


async def test_refresh_asks_the_upstream_now_and_keeps_the_record_if_it_is_down(
    admin: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    first, _ = fake.add_image("library/a", "1", [b"one"])
    await pull(admin, "a", "1")
    second, _ = fake.add_image("library/a", "1", [b"two"])
    cached = await admin.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert cached.headers["Docker-Content-Digest"] == first  # within tag_ttl
    refreshed = (await admin.post("/admin/refresh", json={"ref": "a:1"})).json()
    assert (refreshed["digest"], refreshed["result"]) == (second, "miss")
    response = await admin.get("/v2/library/a/manifests/1", headers=ACCEPT)
    assert response.headers["Docker-Content-Digest"] == second
    fake.down = True
    stale = (await admin.post("/admin/refresh", json={"ref": "a:1"})).json()
    assert (stale["digest"], stale["result"]) == (second, "stale")


async def test_purge_keeps_what_another_tag_or_index_still_uses(
    admin: httpx.AsyncClient, fake: FakeRegistry
) -> None:
    image, _ = fake.add_image("library/a", "1", [b"layer"])
    fake.tags[("library/a", "latest")] = image
    await pull(admin, "a", "1")
    await pull(admin, "a", "latest")
    result = (await admin.post("/admin/purge", json={"kind": "tag", "ref": "a:1"})).json()
    assert (result["tags"], result["manifests"], result["blobs"]) == (1, 0, 0)
    before = fake.total
    await pull(admin, "a", "latest")
    assert fake.total == before  # all of it still cached

    forced = await admin.post("/admin/purge", json={"kind": "digest", "ref": image})
    assert forced.json()["manifests"] == 1 and forced.json()["blobs"] == 2
    manifests = fake.count("GET", "manifest")
    await pull(admin, "a", "latest")
    assert fake.count("GET", "manifest") == manifests + 1  # its record outlived the manifest
