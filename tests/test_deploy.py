"""The operator kit only speaks of metrics that /metrics really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exposed_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def _expressions(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _expressions(value)]
    if isinstance(node, list):
        return [e for item in node for e in _expressions(item)]
    return []


@pytest.mark.anyio
async def test_dashboard_and_alerts_reference_only_exposed_metrics(
    client: httpx.AsyncClient,
) -> None:
    exposed = _exposed_names((await client.get("/metrics")).text)
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = _expressions(dashboard)
    assert len(expressions) > 10
    alerts = (DEPLOY / "alerts.yml").read_text()
    used = {n for e in expressions for n in re.findall(r"\bmirror_[a-z_]+", e)}
    used |= set(re.findall(r"\bmirror_[a-z_]+", alerts))
    assert used, "the kit uses no mirror metric at all"
    assert sorted(used - exposed) == []
