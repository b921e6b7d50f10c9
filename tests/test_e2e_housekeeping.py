"""Housekeeping of issue 10: private cache files, log lines that cannot be forged."""

from __future__ import annotations

import json
import logging
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror.logs import _TextFormatter
from tests.support.dialects import OCI_MANIFEST, DialectRegistry
from tests.support.hosts import AppServer
from tests.support.mirror import MirrorProcess, run_cli

pytestmark = pytest.mark.e2e

ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture
def registry() -> Iterator[DialectRegistry]:
    registry = DialectRegistry(anonymous={"team/a", "team/b"})
    with AppServer(registry.app) as server:
        registry.url = server.url
        yield registry


def test_cache_files_are_the_service_users_alone(tmp_path: Path, registry: DialectRegistry) -> None:
    layer = registry.add_image("team/a", b"layer a" * 1000)
    registry.add_image("team/b", b"layer b" * 1000)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)  # as an older version, or an operator, left it
    upstream = {"name": "reg.test", "url": registry.url, "retries": 0}
    # Two workers: they count metrics in files of the cache directory (one counts in memory).
    mirror = MirrorProcess([upstream], cache_dir=cache, workdir=tmp_path / "mirror", workers=2)
    with mirror:
        with httpx.Client(base_url=mirror.url) as client:
            assert client.get("/v2/team/a/manifests/1", headers=ACCEPT).status_code == 200
            assert client.get(f"/v2/team/a/blobs/{layer}").status_code == 200
            assert client.get("/metrics").status_code == 200
        warm = run_cli("warm", "reg.test/team/b:1", "--config", str(mirror.config_path))
        assert warm.returncode == 0, warm.stderr
    entries = [cache, *cache.rglob("*")]
    # the index, blob files, metrics files, and the fill and lock directories are all here
    assert {"cache.db", "tmp", "locks"} <= {p.name for p in entries}
    for part in ("blobs", "metrics"):
        assert any(part in p.relative_to(cache).parts and p.is_file() for p in entries)
    loose = [
        f"{p.relative_to(tmp_path)} {stat.filemode(p.stat().st_mode)}"
        for p in entries
        if p.stat().st_mode & 0o077
    ]
    assert loose == []


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_request_path_cannot_forge_a_log_line(tmp_path: Path, log_format: str) -> None:
    forged = "2026-01-01 00:00:00,000 INFO [1] mirror.access: forged"
    path = "/v2/a%0A" + forged.replace(" ", "%20") + "%0D%C2%85%E2%80%A8/manifests/1"
    upstream = {"name": "reg.test", "url": "http://127.0.0.1:9", "retries": 0}
    env = {"MIRROR_SERVER_LOG_FORMAT": log_format}
    with MirrorProcess([upstream], env=env, workdir=tmp_path) as mirror:
        with httpx.Client(base_url=mirror.url) as client:
            assert client.get(path).status_code in (400, 404)
    lines = mirror.log().splitlines()  # stopped: its access line is written by now
    (line,) = [line for line in lines if "forged" in line]
    if log_format == "json":
        assert json.loads(line)["path"].startswith("/v2/a\n2026-01-01")
    else:
        assert "/v2/a\\n2026-01-01" in line and "\\r\\x85\\u2028/manifests/1" in line
    assert not any(line.startswith("2026-01-01") for line in lines)


def test_an_exception_message_cannot_forge_a_log_line() -> None:
    formatter = _TextFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("bad path /v2/a\nERROR forged\r\x1b[2J")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, "", 0, "x\ny", (), sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert lines[0] == "ERROR x\\ny"
    assert all(line.startswith("  ") for line in lines[1:])
    # a message's own line break stays (tracebacks are lines), but indented like the rest
    assert lines[-2:] == ["  ValueError: bad path /v2/a", "  ERROR forged\\r\\x1b[2J"]
