"""The status page in a real headless Chromium: it loads without console errors, shows
the figures of what a test pulled, and a purge from the page takes effect."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from mirror.config import Settings
from mirror.web.app import create_app
from tests.conftest import Clock, live_server
from tests.fakes import FakeRegistry
from tests.support.browser import Chromium
from tests.support.pulls import pull

pytestmark = pytest.mark.anyio


async def test_status_page_shows_the_cache_and_purges_from_the_page(
    settings: Settings, fake: FakeRegistry, clock: Clock, tmp_path: Path
) -> None:
    fake.add_image("library/a", "1", [os.urandom(300_000)])
    fake.add_image("library/b", "1", [os.urandom(200_000)])
    app = create_app(settings, upstream_transport=httpx.MockTransport(fake), now=clock)
    async with (
        live_server(app) as live,
        httpx.AsyncClient(base_url=live.url) as client,
        Chromium() as browser,
    ):
        await pull(client, "a", "1")
        await pull(client, "b", "1")
        await pull(client, "a", "1")  # hits: bytes served from the cache
        status = (await client.get("/admin/status")).json()
        assert status["bytes_from_cache"] > 300_000

        page = await browser.page()
        try:
            await page.send("Page.navigate", {"url": f"{live.url}/ui"})
            await page.wait_for("document.body && document.body.dataset.loaded === 'true'")
            names = await page.wait_for(
                "(() => { const rows = [...document.querySelectorAll('#repositories tr')];"
                " return rows.length ? rows.map(r => r.dataset.name) : null; })()"
            )
            assert names == ["docker.io/library/a", "docker.io/library/b"]
            shown = await page.evaluate(
                "JSON.stringify(Object.fromEntries(['lookups', 'hit-ratio', 'fills', 'pins',"
                " 'bytes-saved', 'cache-size'].map(id => [id,"
                " document.getElementById(id).textContent])))"
            )
            figures = json.loads(shown)
            assert figures["lookups"] == str(status["lookups"])
            assert figures["hit-ratio"] == f"{round(100 * status['hit_ratio'])} %"
            assert figures["fills"] == "0" and figures["pins"] == "0"
            assert figures["bytes-saved"].endswith("KiB")  # the 300 kB layer, served again
            upstream = await page.evaluate("document.getElementById('upstreams').textContent")
            assert "docker.io" in upstream and "up" in upstream
            top = await page.evaluate("document.getElementById('top').textContent")
            assert "docker.io/library/a:1" in top
            await page.screenshot(tmp_path / "status.png")

            button = "document.querySelector('button.purge[data-name=\"docker.io/library/a\"]')"
            await page.evaluate(f"{button}.click()")
            await page.evaluate(f"{button}.click()")  # confirm
            await page.wait_for(
                "!document.querySelector('#repositories tr[data-name=\"docker.io/library/a\"]')"
            )
            freed = await page.evaluate("document.getElementById('error').dataset.freed")
            assert int(freed) > 300_000
            await page.screenshot(tmp_path / "status-after-purge.png")
            assert page.console_errors() == []
        finally:
            await page.close()

        listing = (await client.get("/admin/repositories")).json()["repositories"]
        assert [r["name"] for r in listing] == ["docker.io/library/b"]
        before = fake.count("GET", "blob")
        await pull(client, "a", "1")
        assert fake.count("GET", "blob") == before + 1  # its layer; the config is b's too
    assert (tmp_path / "status.png").stat().st_size > 0
