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
