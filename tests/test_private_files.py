"""Files a fill creates are the service user's alone, whatever the process's umask."""

from __future__ import annotations

import asyncio
import os
import stat

import httpx
import pytest

from mirror.config import Settings
from tests.conftest import fills_settled, live_server
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.anyio


def _loose(paths: list[os.PathLike[str]]) -> list[str]:
    return [f"{p} {stat.filemode(os.stat(p).st_mode)}" for p in paths if os.stat(p).st_mode & 0o077]


async def test_temp_lock_and_blob_files_are_private(
    live: live_server, fake: FakeRegistry, settings: Settings
) -> None:
    old = os.umask(0o022)  # what a service started by hand may have
    try:
        directory = settings.cache.directory
        digest = fake.add_blob(os.urandom(2 * 1024 * 1024))
        fake.hold_blobs = asyncio.Event()
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            async with client.stream("GET", f"/v2/library/a/blobs/{digest}") as response:
                await asyncio.wait_for(fake.halfway.wait(), timeout=30)
                during = [*(directory / "tmp").iterdir(), *(directory / "locks").iterdir()]
                assert len(during) == 2  # the fill's temporary file and its lock
                loose = _loose([directory / "tmp", directory / "locks", *during])
                fake.hold_blobs.set()
                await response.aread()
            await fills_settled(client)
    finally:
        os.umask(old)
    blobs = [p for p in (directory / "blobs").rglob("*") if p.is_file()]
    assert loose == [] and len(blobs) == 1
    assert _loose([*blobs, directory]) == []
