"""The operator kit only speaks of metrics that /metrics really exposes."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mirror.config import ConfigError, Settings, UpstreamSettings, load

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY.parent / "Dockerfile"
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


# --- Replicas: deploy/kubernetes/ and compose.replicas.yaml --------------------------

# Secrets of the right shape, as the Secret mirror-secrets (or replicas.env) holds them.
_FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "MIRROR_REDIS_URL": "rediss://:password@redis.example.internal:6379/0",
    "MIRROR_PEER_SECRET": "0123456789abcdef" * 4,
    "MIRROR_DOCKER_IO_USERNAME": "someone",
    "MIRROR_DOCKER_IO_PASSWORD": "dckr_pat_example",
}
_FAKE_POD_IP = "10.42.0.7"
_OLDEST_KUBERNETES = "1.30"  # the oldest release the manifests are written for


def _assert_variables_are_configuration(
    environment: Mapping[str, str], config: Path, feeders: Collection[str] = ()
) -> Settings:
    """Each variable overrides a key the configuration has, is a secret the configuration
    reads, or only feeds the value of another variable (``feeders``)."""
    settings = load(config, environment)
    raw = tomllib.loads(config.read_text())
    named = {u[k] for u in raw["upstreams"] for k in ("username_env", "password_env") if k in u}
    named |= {v for k, v in raw.get("storage", {}).items() if k.endswith("_env")}
    for variable in set(environment) - set(feeders):
        section, _, key = variable.removeprefix("MIRROR_").lower().partition("_")
        table = getattr(settings, section, None) if variable.startswith("MIRROR_") else None
        if dataclasses.is_dataclass(table):  # MIRROR_<SECTION>_<KEY>
            assert key in {f.name for f in dataclasses.fields(table)}, variable
        elif variable.startswith("MIRROR_UPSTREAMS_"):
            index, _, name = key.partition("_")
            assert int(index) < len(settings.upstreams), variable
            assert name in {f.name for f in dataclasses.fields(UpstreamSettings)}, variable
        elif variable not in named:  # then a secret under its default name: needed
            without = {k: v for k, v in environment.items() if k != variable}
            with pytest.raises(ConfigError) as refused:
                load(config, without)
            assert refused.value.key.startswith("storage.") and refused.value.key.endswith("_env")
            assert variable in str(refused.value)
    return settings


def _manifests() -> dict[str, dict[str, Any]]:
    """Kind → the resource of that kind in deploy/kubernetes/, the Secret example included."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"a second {document['kind']} in {path.name}"
            found[document["kind"]] = document
    return found


def _pod(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = manifests["Deployment"]["spec"]["template"]["spec"]
    return pod


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = _pod(manifests)["containers"]
    assert isinstance(container, dict)
    return container


def _pod_environment(container: dict[str, Any], secrets: Mapping[str, str]) -> dict[str, str]:
    """What the kubelet hands the container: values with $(VAR) expanded from the
    variables before them, the pod's address, the Secret's keys (optional ones may lack)."""
    environment: dict[str, str] = {}
    for variable in container["env"]:
        source = variable.get("valueFrom")
        if source is None:
            value = re.sub(r"\$\((\w+)\)", lambda m: environment[m[1]], variable["value"])
            environment[variable["name"]] = value
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP"
            environment[variable["name"]] = _FAKE_POD_IP
        elif (key := source["secretKeyRef"]["key"]) in secrets:
            environment[variable["name"]] = secrets[key]
        else:
            assert source["secretKeyRef"].get("optional"), f"the Secret must hold {key}"
    return environment


def _image_config_path() -> Path:
    """The configuration file the image's entry point reads."""
    match = re.search(r'^ENTRYPOINT \[.*"--config", "([^"]+)"\]$', DOCKERFILE.read_text(), re.M)
    assert match is not None
    return Path(match[1])


def _kubernetes_settings(tmp_path: Path, secrets: Mapping[str, str] = _FAKE_SECRETS) -> Settings:
    """The ConfigMap's config.toml, read where the image reads it, with the pod's environment."""
    manifests = _manifests()
    container = _container(manifests)
    volumes = {v["name"]: v for v in _pod(manifests)["volumes"]}
    mounts = {Path(m["mountPath"]): volumes[m["name"]] for m in container["volumeMounts"]}
    config_path = _image_config_path()
    config_map = manifests["ConfigMap"]
    assert mounts[config_path.parent]["configMap"]["name"] == config_map["metadata"]["name"]
    config = tmp_path / config_path.name
    config.write_text(config_map["data"][config_path.name])
    feeders = set(re.findall(r"\$\((\w+)\)", json.dumps(container["env"])))
    return _assert_variables_are_configuration(
        _pod_environment(container, secrets), config, feeders
    )


_BINARY_UNITS = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert match is not None, f"{quantity!r}: write sizes in Ki, Mi, Gi or Ti"
    return int(match[1]) * _BINARY_UNITS[match[2] or ""]


@pytest.mark.parametrize("version", [_OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_kubernetes_manifests_follow_the_api_schemas(version: str) -> None:
    for kind, resource in _manifests().items():
        if kind != "Kustomization":  # strict: an unknown or misspelt field fails too
            kubernetes_validate.validate(resource, version, strict=True)


def test_the_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    manifests = _manifests()
    kustomization = manifests.pop("Kustomization")
    files = {p.name for p in KUBERNETES.glob("*.yaml")}
    assert sorted(kustomization["resources"]) == sorted(
        files - {"kustomization.yaml", "secret.example.yaml"}
    )
    # Namespace-agnostic: `kubectl apply -k … -n NS` or an overlay picks it.
    assert "namespace" not in kustomization
    assert all("namespace" not in resource["metadata"] for resource in manifests.values())
    (image,) = kustomization["images"]
    assert image["name"] == _container(manifests)["image"]
    # The example holds exactly the keys the Deployment reads, under the Secret's name.
    references = [
        v["valueFrom"]["secretKeyRef"]
        for v in _container(manifests)["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    ]
    secret = manifests["Secret"]
    assert {r["name"] for r in references} == {secret["metadata"]["name"]}
    assert sorted(r["key"] for r in references) == sorted(secret["stringData"])
    assert set(_FAKE_SECRETS) == set(secret["stringData"])


def test_kubernetes_replicas_load_the_configmap_with_the_pods_environment(
    tmp_path: Path,
) -> None:
    settings = _kubernetes_settings(tmp_path)
    storage = settings.storage
    assert storage.backend == "s3"
    assert storage.advertise_url == f"http://{_FAKE_POD_IP}:{settings.server.port}"
    assert (storage.access_key, storage.secret_key) == (
        _FAKE_SECRETS["AWS_ACCESS_KEY_ID"],
        _FAKE_SECRETS["AWS_SECRET_ACCESS_KEY"],
    )
    assert storage.redis_url == _FAKE_SECRETS["MIRROR_REDIS_URL"]
    assert storage.peer_secret == _FAKE_SECRETS["MIRROR_PEER_SECRET"]
    assert settings.default_upstream.name == "docker.io"
    assert settings.default_upstream.username == _FAKE_SECRETS["MIRROR_DOCKER_IO_USERNAME"]
    # Without the optional Docker Hub keys in the Secret: anonymous pulls.
    anonymous = {k: v for k, v in _FAKE_SECRETS.items() if "DOCKER_IO" not in k}
    assert _kubernetes_settings(tmp_path, anonymous).default_upstream.username is None


@pytest.mark.anyio
async def test_kubernetes_probes_ports_and_scrapes_reach_the_app(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    manifests = _manifests()
    container = _container(manifests)
    server = _kubernetes_settings(tmp_path).server
    (port,) = container["ports"]
    assert port["containerPort"] == server.port
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness")}
    probes["readiness"] = container["readinessProbe"]["httpGet"]
    assert {p["port"] for p in probes.values()} == {port["name"]}
    assert [probes[k]["path"] for k in ("startup", "liveness", "readiness")] == [
        "/healthz",
        "/healthz",
        "/readyz",
    ]
    for probe in probes.values():  # the app answers them (here on a fresh disk cache)
        assert (await client.get(probe["path"])).status_code == 200
    (service_port,) = manifests["Service"]["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (server.port, port["name"])
    scrape = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    metrics_port = server.metrics_address.rpartition(":")[2] if server.metrics_address else None
    assert int(scrape["prometheus.io/port"]) == int(metrics_port or server.port)
    assert (await client.get(scrape["prometheus.io/path"])).status_code == 200


def test_kubernetes_pods_run_as_the_image_user_and_write_only_to_their_volumes(
    tmp_path: Path,
) -> None:
    manifests = _manifests()
    pod, container = _pod(manifests), _container(manifests)
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M)
    assert user is not None
    uid, gid = int(user[1]), int(user[2])
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "fsGroup": gid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    # The root file system is read-only: what the mirror writes are emptyDirs.
    settings = _kubernetes_settings(tmp_path)
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {
        m["mountPath"]: volumes[m["name"]]["emptyDir"]
        for m in container["volumeMounts"]
        if not m.get("readOnly")
    }
    assert set(writable) == {str(settings.cache.directory), "/tmp"}
    # The hot tier's volume holds max_size and the blobs being filled (each at most
    # max_blob_share of it); going past sizeLimit would get the pod evicted.
    tier = _bytes(writable[str(settings.cache.directory)]["sizeLimit"])
    assert tier >= settings.cache.max_size * (1 + settings.cache.max_blob_share)
    requested = _bytes(container["resources"]["requests"]["ephemeral-storage"])
    assert requested >= sum(_bytes(v["sizeLimit"]) for v in writable.values())


def test_kubernetes_services_inject_no_configuration(tmp_path: Path) -> None:
    # A Service named mirror-cache would give every pod MIRROR_CACHE_SERVICE_HOST, which
    # the mirror reads as the key cache.service_host and refuses, unless service links
    # are off.
    manifests = _manifests()
    assert _pod(manifests)["enableServiceLinks"] is False
    config = tmp_path / "config.toml"
    config.write_text(manifests["ConfigMap"]["data"]["config.toml"])
    environment = _pod_environment(_container(manifests), _FAKE_SECRETS)
    with pytest.raises(ConfigError, match="cache.service_host"):
        load(config, {**environment, "MIRROR_CACHE_SERVICE_HOST": "10.0.0.1"})


def test_kubernetes_keeps_replicas_apart_available_and_draining() -> None:
    manifests = _manifests()
    spec, pod, container = manifests["Deployment"]["spec"], _pod(manifests), _container(manifests)
    assert spec["replicas"] == 3
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert manifests["Service"]["spec"]["selector"] == selector
    budget = manifests["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"] == selector
    assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread.values())
    # Termination: preStop's sleep while the endpoints drop the pod, then the seconds
    # the server gives requests under way after SIGTERM, all within the grace period.
    program, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    assert program == "sleep"
    source = "\n".join(p.read_text() for p in (DEPLOY.parent / "mirror").rglob("*.py"))
    (shutdown,) = re.findall(r"timeout_graceful_shutdown\"?\s*[=:]\s*(\d+)", source)
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + int(shutdown)


def _env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    pairs = [line.partition("=") for line in lines if line.strip() and not line.startswith("#")]
    assert all(sep for _, sep, _ in pairs), path
    return {name: value for name, _, value in pairs}


def _interpolate(node: Any, variables: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} in every string of the file."""
    if isinstance(node, dict):
        return {k: _interpolate(v, variables) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, variables) for v in node]
    if not isinstance(node, str):
        return node

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match[1], match[2], match[3]
        assert name in variables, f"${{{name}}} is not in replicas.env.example"
        if variables[name]:
            return variables[name]
        assert operator != ":?", f"compose refuses to start without {name}: {argument}"
        return argument or ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", value, node)


def _replicas_compose() -> dict[str, Any]:
    text = (DEPLOY / "compose.replicas.yaml").read_text()
    compose: dict[str, Any] = _interpolate(
        yaml.safe_load(text), _env_file(DEPLOY / "replicas.env.example")
    )
    return compose


def _replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if "build" in s}


def test_compose_replicas_share_a_bucket_and_redis_each_with_a_tier_of_its_own() -> None:
    compose = _replicas_compose()
    services, replicas = compose["services"], _replicas(compose)
    assert len(replicas) == 3
    tiers = set()
    for name, replica in replicas.items():
        assert (DEPLOY / replica["build"] / "Dockerfile").is_file()
        environment = {k: str(v) for k, v in replica["environment"].items()}
        settings = _assert_variables_are_configuration(environment, DEPLOY.parent / "config.toml")
        storage = settings.storage
        assert storage.advertise_url == f"http://{name}:{settings.server.port}"
        tier = _mounts(replica)[str(settings.cache.directory)]
        assert tier in compose["volumes"] and tier not in tiers
        tiers.add(tier)
        # The S3 server: SeaweedFS with the same keys, making the bucket at start.
        endpoint = httpx.URL(storage.endpoint or "")
        s3 = services[endpoint.host]
        command, *flags = s3["command"]
        options = dict(f.lstrip("-").partition("=")[::2] for f in flags)
        assert command == "mini"
        assert endpoint.port == int(options.get("s3.port", 8333))  # SeaweedFS's default
        assert storage.bucket in options["bucket"].split(",")
        keys = (s3["environment"]["AWS_ACCESS_KEY_ID"], s3["environment"]["AWS_SECRET_ACCESS_KEY"])
        assert keys == (storage.access_key, storage.secret_key)
        redis = urlsplit(storage.redis_url)
        assert services[redis.hostname or ""]["image"].startswith("redis:")
        assert (redis.port or 6379) == 6379
        assert replica["depends_on"] == {
            endpoint.host: {"condition": "service_healthy"},
            redis.hostname: {"condition": "service_healthy"},
        }
        assert (
            "healthcheck" in services[endpoint.host] and "healthcheck" in services[redis.hostname]
        )
        assert replica["read_only"] is True and replica["cap_drop"] == ["ALL"]


def test_compose_replicas_balancer_sends_clients_to_ready_replicas() -> None:
    compose = _replicas_compose()
    replicas = _replicas(compose)
    (balancer,) = (s for s in compose["services"].values() if s["image"].startswith("haproxy:"))
    environment = {k: str(v) for k, v in next(iter(replicas.values()))["environment"].items()}
    port = load(DEPLOY.parent / "config.toml", environment).server.port
    assert _published(balancer) == {port}
    config = DEPLOY / _mounts(balancer)["/usr/local/etc/haproxy/haproxy.cfg"]
    text = config.read_text()
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)$", text, re.M)
    assert sorted((host, int(p)) for _, host, p in servers) == [(n, port) for n in sorted(replicas)]
    assert re.search(rf"^\s*bind :{port}$", text, re.M)
    assert re.search(r"^\s*http-check send meth GET uri /readyz$", text, re.M)
    # HAProxy's own check (Debian's haproxy). The replicas' names and the resolver exist
    # only in compose, not in the tests' loopback-only network.
    result = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    elsewhere = re.compile(r"could not resolve address|can't connect socket for nameserver")
    problems = [
        line
        for line in output.splitlines()
        if re.search(r"WARNING|ALERT", line) and not elsewhere.search(line)
    ]
    assert problems == []
