"""End to end: /metrics adds up what every worker process counted."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import SeededUpstream
from tests.support.ports import free_port, wait_http_ok
from tests.test_metrics import cache, parse, value

pytestmark = pytest.mark.e2e


def test_with_two_workers_metrics_count_every_process(seeded: SeededUpstream) -> None:
    digest = seeded.single.manifest_digest
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    with seeded.mirror(workers=2) as mirror:
        url = f"{mirror.url}/v2/library/test/manifests/{digest}"
        assert httpx.get(url, headers=accept).status_code == 200  # the one miss
        hits = 0
        # A new connection each time, so the kernel spreads them over both workers;
        # on a loaded machine the second worker may start late, so ask until it answered.
        while hits < 30 or len(_workers_that_hit(mirror.log())) < 2:
            assert hits < 2000, "the second worker never answered"
            assert httpx.get(url, headers=accept).status_code == 200
            hits += 1
        samples = parse(httpx.get(f"{mirror.url}/metrics").text)
    assert cache(samples, "manifest", "miss") == 1
    assert cache(samples, "manifest", "hit") == hits
    assert (
        value(samples, "mirror_http_requests_total", route="manifest", method="GET", status="200")
        == hits + 1
    )


def _workers_that_hit(log: str) -> set[str]:
    """The worker pids of the access-log lines that were cache hits."""
    return {line.split("[")[1].split("]")[0] for line in log.splitlines() if "cache=hit" in line}


def test_metrics_can_be_served_on_a_separate_address(seeded: SeededUpstream) -> None:
    address = f"127.0.0.1:{free_port()}"
    with seeded.mirror(env={"MIRROR_SERVER_METRICS_ADDRESS": address}) as mirror:
        assert httpx.get(f"{mirror.url}/metrics").status_code == 404
        httpx.get(f"{mirror.url}/v2/library/test/manifests/1")
        response = wait_http_ok(f"http://{address}/metrics")
        samples = parse(response.text)
        assert value(samples, "mirror_cache_max_size_bytes") > 0
        assert (
            value(
                samples, "mirror_http_requests_total", route="manifest", method="GET", status="200"
            )
            == 1
        )
