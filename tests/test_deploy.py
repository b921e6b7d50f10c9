"""The operator kit only speaks of metrics that /metrics really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mirror.config import load

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


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return compose


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → bind-mount source (a path under deploy/) or volume name."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rpartition(":")[2]) for p in service.get("ports", [])}


def test_compose_runs_the_mirror_as_its_configuration_says() -> None:
    mirror = _compose()["services"]["mirror"]
    assert (DEPLOY / mirror["build"] / "Dockerfile").is_file()
    environment = {k: str(v) for k, v in mirror["environment"].items()}
    settings = load(DEPLOY.parent / "config.toml", environment)  # each override parses
    upstreams = tomllib.loads((DEPLOY.parent / "config.toml").read_text())["upstreams"]
    credentials = {u[k] for u in upstreams for k in ("username_env", "password_env") if k in u}
    for variable in environment:
        assert variable in credentials or variable.startswith(
            ("MIRROR_SERVER_", "MIRROR_CACHE_", "MIRROR_UPSTREAMS_")
        ), variable
    assert settings.server.port in _published(mirror)
    assert _mounts(mirror)[str(settings.cache.directory)] in _compose()["volumes"]
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert f"VOLUME {settings.cache.directory}\n" in dockerfile
    assert f"EXPOSE {settings.server.port}\n" in dockerfile


def test_compose_prometheus_scrapes_the_mirror_and_loads_the_alerts() -> None:
    compose = _compose()
    prometheus = compose["services"]["prometheus"]
    mounts = _mounts(prometheus)
    config_path = next(a[len("--config.file=") :] for a in prometheus["command"] if "config" in a)
    assert mounts[config_path] == "./prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    for rules in config["rule_files"]:  # resolved next to the config file, as here
        assert (DEPLOY / mounts[f"{Path(config_path).parent}/{rules}"]).is_file()
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mirror")
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert host in compose["services"]
    environment = {k: str(v) for k, v in compose["services"][host]["environment"].items()}
    server = load(DEPLOY.parent / "config.toml", environment).server
    metrics_port = server.metrics_address.rpartition(":")[2] if server.metrics_address else None
    assert int(port) == int(metrics_port or server.port)


def test_compose_grafana_gets_prometheus_and_the_dashboard() -> None:
    compose = _compose()
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = httpx.URL(source["url"])
    assert url.host in compose["services"] and url.port in _published(compose["services"][url.host])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "mirror.yml").read_text())[
        "providers"
    ]
    dashboards = [
        s for t, s in mounts.items() if Path(t).parent == Path(provider["options"]["path"])
    ]
    assert dashboards == ["./grafana-dashboard.json"]
    for source_path in mounts.values():
        assert not source_path.startswith(".") or (DEPLOY / source_path).exists(), source_path


def test_the_systemd_unit_verifies_is_hardened_and_matches_the_configuration(
    tmp_path: Path,
) -> None:
    unit = DEPLOY / "systemd" / "mirror.service"
    text = unit.read_text()
    directives = dict(re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE))
    program, *arguments = directives["ExecStart"].split()
    # `verify` checks that ExecStart's program exists: a root of our own holds it, the
    # unit and systemd's own units, so the check covers the unit exactly as shipped.
    root = tmp_path / "root"
    (root / program.lstrip("/")).parent.mkdir(parents=True)
    shutil.copy(Path(sys.executable).parent / "mirror", root / program.lstrip("/"))
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit, root / "etc/systemd/system")
    verify = ["systemd-analyze", "verify", f"--root={root}", unit.name]
    result = subprocess.run(verify, capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    security = ["systemd-analyze", "security", "--offline=yes", str(unit)]
    report = subprocess.run(security, capture_output=True, text=True, check=True).stdout
    exposure = re.search(r"Overall exposure level for mirror.service: ([\d.]+)", report)
    assert exposure is not None and float(exposure[1]) <= 2.0, report
    # The unit's directories are the configuration's.
    assert arguments == [
        "serve",
        "--config",
        f"/etc/{directives['ConfigurationDirectory']}/config.toml",
    ]
    settings = load(DEPLOY.parent / "config.toml", {})
    assert settings.cache.directory == Path("/var/cache") / directives["CacheDirectory"]
