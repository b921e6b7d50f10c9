"""``mirror ls | inspect | purge | pin | unpin | verify`` on a running mirror (through
the admin API of a real uvicorn) and on a stopped cache directory (``--config``)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import anyio
import httpx
import pytest

from mirror.cli.main import main
from mirror.config import Settings, parse
from mirror.web.app import create_app
from tests.conftest import Clock, live_server
from tests.fakes import FakeRegistry
from tests.support.htpasswd import write_htpasswd
from tests.support.mirror import write_config
from tests.support.pulls import image_size, pull

pytestmark = pytest.mark.anyio


async def mirror(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the command in a thread (it blocks; the server runs on this loop)."""
    code = await anyio.to_thread.run_sync(main, list(argv))
    return code, capsys.readouterr().out


async def test_cli_on_a_running_mirror_and_on_its_cache_directory(
    settings: Settings,
    fake: FakeRegistry,
    clock: Clock,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = os.urandom(2000)
    a, _ = fake.add_image("library/a", "1", [base, os.urandom(3000)])
    b, _ = fake.add_image("acme/b", "2", [base])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with live_server(app) as live, httpx.AsyncClient(base_url=live.url) as client:
        await pull(client, "a", "1")
        await pull(client, "acme/b", "2")
        url = ("--url", live.url)

        code, out = await mirror(capsys, "ls", *url, "--json")
        assert code == 0
        sizes = {r["name"]: r["size"] for r in json.loads(out)["repositories"]}
        assert sizes == {
            "docker.io/acme/b": image_size(fake, b),
            "docker.io/library/a": image_size(fake, a),
        }
        code, out = await mirror(capsys, "ls", *url)
        assert out.splitlines()[0].split() == [
            "REPOSITORY",
            "TAGS",
            "SIZE",
            "PULLS",
            "LAST",
            "PULL",
        ]
        assert [line.split()[0] for line in out.splitlines()[1:]] == [
            "docker.io/acme/b",
            "docker.io/library/a",
        ]
        code, out = await mirror(capsys, "ls", "a", *url)
        assert out.splitlines()[1].startswith("1 ")

        code, out = await mirror(capsys, "inspect", "acme/b:2", *url)
        assert code == 0 and b in out

        code, out = await mirror(capsys, "pin", "a:1", *url)
        assert code == 0 and a in out
        code, out = await mirror(capsys, "pin", *url, "--json")
        assert [p["digest"] for p in json.loads(out)["pins"]] == [a]
        code, out = await mirror(capsys, "unpin", "a:1", *url)
        assert code == 0

        code, out = await mirror(capsys, "purge", "--tag", "acme/b:2", *url, "--json")
        assert code == 0
        assert (json.loads(out)["tags"], json.loads(out)["blobs"]) == (1, 1)  # its config
        code, out = await mirror(capsys, "purge", "--tag", "acme/b:2", *url)
        assert code == 1  # nothing left to purge

        code, out = await mirror(capsys, "refresh", "a:1", *url)
        assert (code, out) == (0, f"a:1 is {a} (revalidated)\n")

        code, out = await mirror(capsys, "verify", *url, "--rate", "1GiB")
        assert code == 0 and "0 corrupt" in out

    # The mirror is stopped: the same from the cache directory.
    config = tmp_path / "config.toml"
    write_config(
        config,
        port=0,
        cache_dir=settings.cache.directory,
        upstreams=[{"name": "docker.io", "url": "http://upstream.fake"}],
    )
    code, out = await mirror(capsys, "ls", "--config", str(config), "--json")
    assert [r["name"] for r in json.loads(out)["repositories"]] == ["docker.io/library/a"]
    with sqlite3.connect(settings.cache.directory / "cache.db") as db:
        (filename,) = db.execute(
            "SELECT filename FROM Cache WHERE key LIKE 'blob:%' LIMIT 1"
        ).fetchone()
    (settings.cache.directory / filename).write_bytes(b"not what it was")
    code, out = await mirror(capsys, "verify", "--config", str(config))
    assert code == 1
    assert "corrupt, dropped: blob:" in out
    code, out = await mirror(capsys, "verify", "--config", str(config))
    assert code == 0


async def test_cli_logs_in_as_an_admin(
    tmp_path: Path,
    fake: FakeRegistry,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"alice": "alice-pw", "bob": "bob-pw"})
    settings = parse(
        {
            "cache": {"directory": str(tmp_path / "cache")},
            "upstreams": [{"name": "docker.io", "url": "http://upstream.fake"}],
            "auth": {"htpasswd": str(htpasswd), "admins": ["alice"]},
        },
        environ={},
    )
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake))
    async with live_server(app) as live:
        monkeypatch.setenv("ALICE_PW", "alice-pw")
        code, out = await mirror(
            capsys, "ls", "--url", live.url, "--user", "alice", "--password-env", "ALICE_PW"
        )
        assert (code, out.split()) == (0, ["REPOSITORY", "TAGS", "SIZE", "PULLS", "LAST", "PULL"])
        monkeypatch.setenv("MIRROR_PASSWORD", "bob-pw")
        code = await anyio.to_thread.run_sync(main, ["ls", "--url", live.url, "--user", "bob"])
        assert code == 1
        assert "403: bob is not an admin" in capsys.readouterr().err
        code = await anyio.to_thread.run_sync(main, ["ls", "--url", live.url])
        assert code == 1
        assert "401: authentication required" in capsys.readouterr().err
