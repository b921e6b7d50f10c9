from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mirror.config import ConfigError, load, parse, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = {"name": "docker.io", "url": "https://registry-1.docker.io"}


def test_the_documented_default_config_loads() -> None:
    settings = load(ROOT / "config.toml", environ={})
    assert settings.server.port == 5000
    assert settings.default_upstream.name == "docker.io"
    assert settings.default_upstream.url == "https://registry-1.docker.io"
    assert settings.default_upstream.username is None
    assert settings.cache.max_size == 50 * 1024**3


def test_credentials_come_from_the_environment_variables_the_file_names() -> None:
    upstream = {**UPSTREAM, "username_env": "HUB_USER", "password_env": "HUB_PASS"}
    settings = parse({"upstreams": [upstream]}, {"HUB_USER": "alice", "HUB_PASS": "s3cret"})
    assert settings.default_upstream.username == "alice"
    assert "s3cret" not in repr(settings)


def test_environment_overrides_every_section() -> None:
    environ = {
        "MIRROR_SERVER_PORT": "6000",
        "MIRROR_CACHE_MAX_SIZE": "2GiB",
        "MIRROR_UPSTREAMS_0_TAG_TTL": "1m",
    }
    settings = parse({"upstreams": [dict(UPSTREAM)]}, environ)
    assert settings.server.port == 6000
    assert settings.cache.max_size == 2 * 1024**3
    assert settings.default_upstream.tag_ttl == 60


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"upstreams": []}, "upstreams", "at least one"),
        ({"upstreams": [{**UPSTREAM, "url": "ftp://x"}]}, "upstreams[0].url", "http(s)"),
        ({"upstreams": [{**UPSTREAM, "tag_ttl": "soon"}]}, "upstreams[0].tag_ttl", "duration"),
        ({"upstreams": [{**UPSTREAM, "colour": 1}]}, "upstreams[0].colour", "unknown key"),
        ({"upstreams": [UPSTREAM, UPSTREAM]}, "upstreams", "more than once"),
        ({"upstreams": [UPSTREAM], "cache": {"max_size": "lots"}}, "cache.max_size", "size"),
        ({"upstreams": [UPSTREAM], "server": {"port": 70000}}, "server.port", "integer"),
        ({"upstreams": [UPSTREAM], "server": {"log_format": "xml"}}, "server.log_format", "json"),
        ({"upstreams": [UPSTREAM], "srever": {}}, "srever", "unknown key"),
    ],
)
def test_bad_config_names_the_key_and_the_reason(
    data: dict[str, object], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(data, {})
    assert caught.value.key == key
    assert reason in str(caught.value)


REPLICA = {
    "backend": "s3",
    "endpoint": "http://127.0.0.1:8333",
    "bucket": "mirror",
    "advertise_url": "http://10.0.0.5:5000",
}
REPLICA_ENV = {
    "AWS_ACCESS_KEY_ID": "key",
    "AWS_SECRET_ACCESS_KEY": "bucket-secret",
    "MIRROR_REDIS_URL": "redis://:redis-secret@127.0.0.1:6379/0",
    "MIRROR_PEER_SECRET": "p" * 32,
}


def test_replica_storage_reads_its_secrets_from_the_environment() -> None:
    environ = {**REPLICA_ENV, "MIRROR_STORAGE_ADVERTISE_URL": "http://10.0.0.6:5000"}
    settings = parse({"upstreams": [UPSTREAM], "storage": REPLICA}, environ)
    storage = settings.storage
    assert storage.shared and storage.bucket == "mirror" and storage.access_key == "key"
    assert storage.advertise_url == "http://10.0.0.6:5000"  # per replica, from its environment
    assert storage.max_size is None and not storage.redirect
    for secret in ("bucket-secret", "redis-secret", "p" * 32):
        assert secret not in repr(settings)
    assert not parse({"upstreams": [UPSTREAM]}, {}).storage.shared


@pytest.mark.parametrize(
    ("storage", "environ", "key", "reason"),
    [
        ({**REPLICA, "backend": "nfs"}, REPLICA_ENV, "storage.backend", "s3"),
        (REPLICA, {**REPLICA_ENV, "AWS_ACCESS_KEY_ID": ""}, "storage.access_key_env", "unset"),
        (REPLICA, {**REPLICA_ENV, "MIRROR_PEER_SECRET": "short"}, "storage.peer_secret_env", "32"),
        (
            REPLICA,
            {**REPLICA_ENV, "MIRROR_REDIS_URL": "http://x"},
            "storage.redis_url_env",
            "redis",
        ),
        ({**REPLICA, "endpoint": "s3.example"}, REPLICA_ENV, "storage.endpoint", "http(s)"),
        ({**REPLICA, "bucket": ""}, REPLICA_ENV, "storage.bucket", "non-empty"),
        ({**REPLICA, "max_size": "big"}, REPLICA_ENV, "storage.max_size", "size"),
        ({**REPLICA, "secret_key": "x"}, REPLICA_ENV, "storage.secret_key", "unknown key"),
        (
            {k: v for k, v in REPLICA.items() if k != "advertise_url"},
            REPLICA_ENV,
            "storage.advertise_url",
            "required",
        ),
    ],
)
def test_bad_replica_storage_names_the_key(
    storage: dict[str, object], environ: dict[str, str], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"upstreams": [UPSTREAM], "storage": storage}, environ)
    assert caught.value.key == key
    assert reason in str(caught.value)


def test_sizes_and_durations() -> None:
    assert parse_size("50GiB", "k") == 50 * 1024**3
    assert parse_size("500MB", "k") == 500 * 1000**2
    assert parse_size(1024, "k") == 1024
    assert parse_duration("5m", "k") == 300
    assert parse_duration("250ms", "k") == 0.25
    assert parse_duration(30, "k") == 30


def test_serve_with_bad_config_exits_with_the_key_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[upstreams]]\nname = "docker.io"\nurl = "nope"\n')
    result = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "upstreams[0].url" in result.stderr
    assert "Traceback" not in result.stderr
