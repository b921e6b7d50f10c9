"""Settings: ``config.toml`` → validated, frozen dataclasses.

Config flows one way: the file, then ``MIRROR_*`` environment overrides from the
mapping passed in, then command-line flags (applied by the caller with
``dataclasses.replace``). Every default lives in the dataclasses below. Bad
input raises ``ConfigError`` naming the key and the reason.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .cpus import usable_cpus
from .security.rules import Rule, compile_pattern

__all__ = [
    "AuthSettings",
    "CacheSettings",
    "LimitSettings",
    "ConfigError",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "UpstreamSettings",
    "load",
    "parse_duration",
    "parse_size",
    "parse_workers",
]


class ConfigError(ValueError):
    """A configuration key has a bad value; the message names the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key


@dataclass(frozen=True)
class UpstreamSettings:
    name: str  # the registry host clients know it by, e.g. "docker.io"
    url: str  # base URL of its v2 API, e.g. "https://registry-1.docker.io"
    username: str | None = None  # read from the environment variable named in the file
    password: str | None = field(default=None, repr=False)
    tag_ttl: float = 300.0  # seconds a tag → digest record is served without asking upstream
    negative_ttl: float = 30.0  # seconds an upstream 404 for a tag is remembered
    connect_timeout: float = 10.0  # seconds
    read_timeout: float = 60.0  # seconds without a byte from the upstream
    retries: int = 3  # extra attempts on connection errors, 5xx and 429
    breaker_failures: int = 3  # failed requests in a row that mark the upstream down
    breaker_cooldown: float = 30.0  # seconds a down upstream is left alone before a probe
    tls_verify: bool | str = True  # True, False (said explicitly) or a CA bundle path
    # Token realms off the upstream's own host that may receive its credentials;
    # Docker Hub's is the default for registry-1.docker.io.
    auth_realms: tuple[str, ...] = ()
    max_fills: int = 16  # blob downloads at once; more wait in line (each holds descriptors)
    fill_queue: int = 1000  # requests waiting for a download slot before 429 TOOMANYREQUESTS
    abandon_after: float = 10.0  # a fill nobody reads this long, under half done, is dropped
    join_timeout: float = 2.0  # wait for another upstream's fill to start before our own route
    revalidate_timeout: float = 2.0  # past it, a stale tag is served; revalidation goes on

    @property
    def official_prefix(self) -> bool:
        """Docker Hub keeps single-component names under ``library/``."""
        return self.name == "docker.io"


@dataclass(frozen=True)
class CacheSettings:
    directory: Path = Path("/var/cache/mirror")
    max_size: int = 50 * 1024**3  # bytes
    offline: bool = False  # never contact any upstream
    max_blob_share: float = 0.25  # larger blobs (as a share of max_size) pass through uncached


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 5000
    workers: int = 1  # "auto" in the file: one per CPU this process may use (cpus.py)
    log_level: str = "info"
    log_format: str = "text"  # or "json": one JSON object per line
    metrics_address: str | None = None  # "host:port" to serve /metrics apart from the API
    header_timeout: float = 30.0  # seconds a client has to send a request's headers
    max_header_bytes: int = 64 * 1024  # request line and headers together
    max_headers: int = 100  # header fields in one request
    tls_certificate: Path | None = None  # PEM chain; with tls_key, the API is served over TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # clients must present a certificate this CA signed


@dataclass(frozen=True)
class AuthSettings:
    """Client authentication; off unless ``htpasswd`` names a file."""

    htpasswd: Path | None = None  # bcrypt htpasswd file, reread when it changes
    realm: str = "mirror"  # the Basic challenge's realm
    tokens: bool = False  # challenge with Bearer and issue tokens at /token
    service: str = "mirror"  # the tokens' audience, named in the Bearer challenge
    token_realm: str | None = None  # the /token URL clients use; default: from the request
    token_ttl: float = 300.0  # seconds an access token is good for
    refresh_token_ttl: float = 30 * 86400.0  # seconds (docker login keeps it as identitytoken)
    token_key: str | None = field(default=None, repr=False)  # from token_key_env
    failed_logins: int = 5  # failures an address may make before it is throttled
    failed_login_window: float = 60.0  # seconds in which failed_logins are forgiven
    anonymous: tuple[str, ...] = ()  # repository patterns clients without credentials may pull
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # group → users
    rules: tuple[Rule, ...] | None = None  # None: every user may pull everything
    admins: tuple[str, ...] = ()  # users who may use /admin and /ui (inventory, purge, pin)

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None


@dataclass(frozen=True)
class LimitSettings:
    """Per-client token buckets; each budget is off while its rate is None."""

    requests_rate: float | None = None  # requests a second, any request
    requests_burst: float = 0.0  # requests at once (default: the rate's count)
    upstream_rate: float | None = None  # requests a second that go upstream (misses)
    upstream_burst: float = 0.0
    per_address: bool = True  # a budget per client address
    per_user: bool = True  # and one per logged-in user


StorageBackend = Literal["disk", "s3"]


@dataclass(frozen=True)
class StorageSettings:
    """Where the cache lives: this host's disk, or a bucket and Redis shared by replicas.

    With ``backend = "s3"`` the ``[cache]`` directory and ``max_size`` are each replica's
    hot tier, ``max_size`` here is the bucket's cap.
    """

    backend: StorageBackend = "disk"
    endpoint: str | None = None  # the S3 API, http(s)://host[:port]
    bucket: str | None = None
    region: str = "us-east-1"
    prefix: str = ""  # every object key starts with it
    access_key: str | None = field(default=None, repr=False)  # from access_key_env
    secret_key: str | None = field(default=None, repr=False)  # from secret_key_env
    max_size: int | None = None  # bytes in the bucket; None: no cap
    redirect: bool = False  # cached blob GETs answered 307 to a presigned URL
    redirect_ttl: float = 600.0  # seconds a presigned URL is good for
    redis_url: str | None = field(default=None, repr=False)  # from redis_url_env
    advertise_url: str | None = None  # how the other replicas reach this one
    peer_secret: str | None = field(default=None, repr=False)  # from peer_secret_env

    @property
    def shared(self) -> bool:
        return self.backend != "disk"


@dataclass(frozen=True)
class Settings:
    upstreams: tuple[UpstreamSettings, ...]
    server: ServerSettings = ServerSettings()
    cache: CacheSettings = CacheSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    storage: StorageSettings = StorageSettings()

    @property
    def default_upstream(self) -> UpstreamSettings:
        return self.upstreams[0]


_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(i)?)?b?\s*")
_DURATION = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: object, key: str) -> int:
    """Bytes from an integer or a string such as ``"50GiB"``, ``"500MB"``, ``"1g"``."""
    if isinstance(value, bool):
        raise ConfigError(key, 'expected a size such as "50GiB"')
    match = _SIZE.fullmatch(str(value))
    if not match:
        raise ConfigError(key, f'expected a size such as "50GiB", got {value!r}')
    number, prefix, binary = match.groups()
    multiplier = (1024 if binary else 1000) ** ("kmgtp".index(prefix.lower()) + 1) if prefix else 1
    size = int(float(number) * multiplier)
    if size <= 0:
        raise ConfigError(key, "must be greater than zero")
    return size


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number or a string such as ``"5m"``, ``"30s"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ConfigError(key, 'expected a duration such as "5m"')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value))
        if not match:
            raise ConfigError(key, f'expected a duration such as "5m" or "30s", got {value!r}')
        seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    if seconds < 0:
        raise ConfigError(key, "must not be negative")
    return seconds


def _bool(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _int(value: object, key: str, *, minimum: int, maximum: int | None = None) -> int:
    try:
        number = int(str(value)) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(key, f"expected an integer {bounds}, got {value!r}")
    return number


def parse_workers(value: object, key: str = "server.workers") -> int:
    """A worker count, or "auto": one per CPU this process may use."""
    if value == "auto":
        return usable_cpus()
    try:
        return _int(value, key, minimum=1)
    except ConfigError:
        raise ConfigError(key, f'expected an integer >= 1 or "auto", got {value!r}') from None


def _share(value: object, key: str) -> float:
    try:
        share = float(str(value)) if not isinstance(value, bool) else -1.0
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise ConfigError(key, f"expected a fraction in (0, 1], got {value!r}")
    return share


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def _table(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a table")
    return value


def _check_keys(table: Mapping[str, object], allowed: set[str], prefix: str) -> None:
    for name in table:
        if name not in allowed:
            raise ConfigError(
                f"{prefix}{name}", f"unknown key (known: {', '.join(sorted(allowed))})"
            )


# The file names credentials by environment variable and a CA bundle by path.
_UPSTREAM_KEYS = {f.name for f in fields(UpstreamSettings)} - {"username", "password"} | {
    "username_env",
    "password_env",
    "ca_bundle",
}


def _upstream(raw: Mapping[str, Any], key: str, environ: Mapping[str, str]) -> UpstreamSettings:
    _check_keys(raw, _UPSTREAM_KEYS, f"{key}.")
    name = _str(raw.get("name"), f"{key}.name").lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d+)?", name):
        raise ConfigError(
            f"{key}.name", f'expected a registry host such as "docker.io", got {name!r}'
        )
    url = _base_url(raw.get("url"), f"{key}.url")
    credentials: dict[str, str | None] = {}
    for which in ("username", "password"):
        variable = raw.get(f"{which}_env")
        credentials[which] = None
        if variable is not None:
            credentials[which] = environ.get(_str(variable, f"{key}.{which}_env")) or None
    if (credentials["username"] is None) != (credentials["password"] is None):
        raise ConfigError(
            f"{key}.username_env", "username and password must both be set or neither"
        )
    tls_verify: bool | str = _bool(raw.get("tls_verify", True), f"{key}.tls_verify")
    if "ca_bundle" in raw:
        bundle = _str(raw["ca_bundle"], f"{key}.ca_bundle")
        if not Path(bundle).is_file():
            raise ConfigError(f"{key}.ca_bundle", f"no such file {bundle!r}")
        tls_verify = bundle
    defaults = UpstreamSettings(name="", url="")
    return UpstreamSettings(
        name=name,
        url=url,
        username=credentials["username"],
        password=credentials["password"],
        tag_ttl=parse_duration(raw.get("tag_ttl", defaults.tag_ttl), f"{key}.tag_ttl"),
        negative_ttl=parse_duration(
            raw.get("negative_ttl", defaults.negative_ttl), f"{key}.negative_ttl"
        ),
        connect_timeout=parse_duration(
            raw.get("connect_timeout", defaults.connect_timeout), f"{key}.connect_timeout"
        ),
        read_timeout=parse_duration(
            raw.get("read_timeout", defaults.read_timeout), f"{key}.read_timeout"
        ),
        retries=_int(raw.get("retries", defaults.retries), f"{key}.retries", minimum=0, maximum=10),
        breaker_failures=_int(
            raw.get("breaker_failures", defaults.breaker_failures),
            f"{key}.breaker_failures",
            minimum=1,
        ),
        breaker_cooldown=parse_duration(
            raw.get("breaker_cooldown", defaults.breaker_cooldown), f"{key}.breaker_cooldown"
        ),
        tls_verify=tls_verify,
        auth_realms=_auth_realms(raw, key, url),
        max_fills=_int(
            raw.get("max_fills", defaults.max_fills), f"{key}.max_fills", minimum=1, maximum=4096
        ),
        fill_queue=_int(raw.get("fill_queue", defaults.fill_queue), f"{key}.fill_queue", minimum=0),
        abandon_after=parse_duration(
            raw.get("abandon_after", defaults.abandon_after), f"{key}.abandon_after"
        ),
        join_timeout=parse_duration(
            raw.get("join_timeout", defaults.join_timeout), f"{key}.join_timeout"
        ),
        revalidate_timeout=parse_duration(
            raw.get("revalidate_timeout", defaults.revalidate_timeout),
            f"{key}.revalidate_timeout",
        ),
    )


# Registries whose token service lives on another host than their API.
_KNOWN_REALMS = {"registry-1.docker.io": ("https://auth.docker.io/token",)}


def _auth_realms(raw: Mapping[str, Any], key: str, url: str) -> tuple[str, ...]:
    value = raw.get("auth_realms")
    if value is None:
        return _KNOWN_REALMS.get(urlsplit(url).hostname or "", ())
    if isinstance(value, str):  # from the environment: comma-separated
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{key}.auth_realms", "expected a list of token realm URLs")
    realms = []
    for realm in value:
        parts = urlsplit(_str(realm, f"{key}.auth_realms"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{key}.auth_realms", f"expected http(s)://host/path, got {realm!r}")
        if parts.scheme == "http" and url.startswith("https:"):
            raise ConfigError(
                f"{key}.auth_realms",
                f"{realm!r}: an https upstream never sends its credentials over http",
            )
        realms.append(realm)
    return tuple(realms)


def _server_tls(server: ServerSettings, raw: Mapping[str, Any]) -> ServerSettings:
    """The TLS file names; whether the files serve is checked by ``web/tls.py`` at start."""
    paths = {
        name: Path(_str(raw[name], f"server.{name}")) if raw.get(name) else None
        for name in ("tls_certificate", "tls_key", "tls_client_ca")
    }
    if (paths["tls_certificate"] is None) != (paths["tls_key"] is None):
        raise ConfigError("server.tls_key", "tls_certificate and tls_key go together")
    if paths["tls_client_ca"] is not None and paths["tls_certificate"] is None:
        raise ConfigError("server.tls_client_ca", "needs tls_certificate and tls_key")
    return dataclasses.replace(
        server,
        tls_certificate=paths["tls_certificate"],
        tls_key=paths["tls_key"],
        tls_client_ca=paths["tls_client_ca"],
    )


def _overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Apply ``MIRROR_<SECTION>_<KEY>`` and ``MIRROR_UPSTREAMS_<N>_<KEY>`` variables."""
    for variable, value in environ.items():
        if not variable.startswith("MIRROR_"):
            continue
        parts = variable[len("MIRROR_") :].lower().split("_", 1)
        if len(parts) != 2:
            continue
        section, rest = parts
        if section in ("server", "cache", "auth", "limits", "storage"):
            data.setdefault(section, {})[rest] = value
        elif section == "upstreams":
            index, _, name = rest.partition("_")
            upstreams = data.get("upstreams") or []
            if index.isdigit() and name and int(index) < len(upstreams):
                upstreams[int(index)][name] = value


def parse(data: dict[str, Any], environ: Mapping[str, str]) -> Settings:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if "upstreams" in data and isinstance(data["upstreams"], list):
        data["upstreams"] = [dict(u) if isinstance(u, dict) else u for u in data["upstreams"]]
    _overrides(data, environ)
    _check_keys(data, {"server", "cache", "upstreams", "auth", "limits", "storage"}, "")

    server_raw = _table(data.get("server", {}), "server")
    _check_keys(server_raw, {f.name for f in fields(ServerSettings)}, "server.")
    server = ServerSettings(
        host=_str(server_raw.get("host", ServerSettings.host), "server.host"),
        port=_int(
            server_raw.get("port", ServerSettings.port), "server.port", minimum=0, maximum=65535
        ),
        workers=parse_workers(server_raw.get("workers", ServerSettings.workers)),
        log_level=_str(server_raw.get("log_level", ServerSettings.log_level), "server.log_level"),
    )
    log_format = server_raw.get("log_format", ServerSettings.log_format)
    if log_format not in ("text", "json"):
        raise ConfigError("server.log_format", f'expected "text" or "json", got {log_format!r}')
    metrics_address = server_raw.get("metrics_address") or None
    if metrics_address is not None:
        host, _, port = _str(metrics_address, "server.metrics_address").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                "server.metrics_address", f"expected host:port, got {metrics_address!r}"
            )
    server = dataclasses.replace(
        server,
        log_format=log_format,
        metrics_address=metrics_address,
        header_timeout=parse_duration(
            server_raw.get("header_timeout", ServerSettings.header_timeout),
            "server.header_timeout",
        ),
        max_header_bytes=_int(
            server_raw.get("max_header_bytes", ServerSettings.max_header_bytes),
            "server.max_header_bytes",
            minimum=1024,
            maximum=16 * 1024 * 1024,
        ),
        max_headers=_int(
            server_raw.get("max_headers", ServerSettings.max_headers),
            "server.max_headers",
            minimum=8,
            maximum=10_000,
        ),
    )
    server = _server_tls(server, server_raw)
    if server.log_level not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigError(
            "server.log_level", "expected one of critical, error, warning, info, debug"
        )

    cache_raw = _table(data.get("cache", {}), "cache")
    _check_keys(cache_raw, {"directory", "max_size", "offline", "max_blob_share"}, "cache.")
    cache = CacheSettings(
        directory=Path(
            _str(str(cache_raw.get("directory", CacheSettings.directory)), "cache.directory")
        ),
        max_size=parse_size(cache_raw.get("max_size", CacheSettings.max_size), "cache.max_size"),
        offline=_bool(cache_raw.get("offline", False), "cache.offline"),
        max_blob_share=_share(
            cache_raw.get("max_blob_share", CacheSettings.max_blob_share), "cache.max_blob_share"
        ),
    )

    upstreams_raw = data.get("upstreams")
    if not isinstance(upstreams_raw, list) or not upstreams_raw:
        raise ConfigError("upstreams", "at least one [[upstreams]] entry is required")
    upstreams = tuple(
        _upstream(_table(raw, f"upstreams[{i}]"), f"upstreams[{i}]", environ)
        for i, raw in enumerate(upstreams_raw)
    )
    names = [u.name for u in upstreams]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("upstreams", f"upstream name {name!r} appears more than once")
    auth = _auth(_table(data.get("auth", {}), "auth"), environ, upstreams)
    limits = _limits(_table(data.get("limits", {}), "limits"))
    storage = _storage(_table(data.get("storage", {}), "storage"), environ)
    return Settings(
        upstreams=upstreams, server=server, cache=cache, auth=auth, limits=limits, storage=storage
    )


# The file names secrets by environment variable, with these defaults.
_STORAGE_SECRETS = {
    "access_key": "AWS_ACCESS_KEY_ID",
    "secret_key": "AWS_SECRET_ACCESS_KEY",
    "redis_url": "MIRROR_REDIS_URL",
    "peer_secret": "MIRROR_PEER_SECRET",
}
_STORAGE_KEYS = {f.name for f in fields(StorageSettings)} - set(_STORAGE_SECRETS) | {
    f"{name}_env" for name in _STORAGE_SECRETS
}


def _base_url(value: object, key: str) -> str:
    url = _str(value, key).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ConfigError(key, f"expected http(s)://host[:port], got {url!r}")
    return url


def _storage(raw: Mapping[str, Any], environ: Mapping[str, str]) -> StorageSettings:
    _check_keys(raw, _STORAGE_KEYS, "storage.")
    backend = raw.get("backend", StorageSettings.backend)
    if backend not in ("disk", "s3"):
        raise ConfigError("storage.backend", f'expected "disk" or "s3", got {backend!r}')
    if backend == "disk":
        return StorageSettings()
    secrets: dict[str, str] = {}
    for name, default in _STORAGE_SECRETS.items():
        variable = _str(raw.get(f"{name}_env", default), f"storage.{name}_env")
        value = environ.get(variable)
        if not value:
            raise ConfigError(
                f"storage.{name}_env", f"the environment variable {variable} is unset"
            )
        secrets[name] = value
    if len(secrets["peer_secret"]) < 32:
        raise ConfigError("storage.peer_secret_env", "the peer secret needs 32+ characters")
    if urlsplit(secrets["redis_url"]).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("storage.redis_url_env", "expected a redis://, rediss:// or unix:// URL")
    if "advertise_url" not in raw:
        raise ConfigError("storage.advertise_url", "required: how other replicas reach this one")
    max_size = raw.get("max_size")
    return StorageSettings(
        backend="s3",
        endpoint=_base_url(raw.get("endpoint"), "storage.endpoint"),
        bucket=_str(raw.get("bucket"), "storage.bucket"),
        region=_str(raw.get("region", StorageSettings.region), "storage.region"),
        prefix=str(raw.get("prefix", "")),
        max_size=None if max_size is None else parse_size(max_size, "storage.max_size"),
        redirect=_bool(raw.get("redirect", False), "storage.redirect"),
        redirect_ttl=parse_duration(
            raw.get("redirect_ttl", StorageSettings.redirect_ttl), "storage.redirect_ttl"
        ),
        advertise_url=_base_url(raw["advertise_url"], "storage.advertise_url"),
        **secrets,
    )


_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]*)\s*")


def parse_rate(value: object, key: str) -> tuple[float, float]:
    """(per second, count) from ``"20/s"``, ``"100/6h"``, ``"600/m"``."""
    match = _RATE.fullmatch(str(value).lower())
    if isinstance(value, bool) or not match:
        raise ConfigError(key, f'expected a rate such as "20/s" or "100/6h", got {value!r}')
    count, number, unit = match.groups()
    seconds = parse_duration(f"{number or 1}{unit or 's'}", key)
    if float(count) <= 0 or seconds <= 0:
        raise ConfigError(key, "a rate must be greater than zero")
    return float(count) / seconds, float(count)


def _limits(raw: Mapping[str, Any]) -> LimitSettings:
    _check_keys(
        raw,
        {"requests", "requests_burst", "upstream", "upstream_burst", "per_address", "per_user"},
        "limits.",
    )
    budgets: dict[str, float | None] = {}
    for name in ("requests", "upstream"):
        rate: float | None = None
        burst = 0.0
        if raw.get(name):
            rate, burst = parse_rate(raw[name], f"limits.{name}")
            if f"{name}_burst" in raw:
                burst = float(_int(raw[f"{name}_burst"], f"limits.{name}_burst", minimum=1))
        budgets[f"{name}_rate"], budgets[f"{name}_burst"] = rate, max(burst, 1.0)
    return LimitSettings(
        requests_rate=budgets["requests_rate"],
        requests_burst=budgets["requests_burst"] or 1.0,
        upstream_rate=budgets["upstream_rate"],
        upstream_burst=budgets["upstream_burst"] or 1.0,
        per_address=_bool(raw.get("per_address", True), "limits.per_address"),
        per_user=_bool(raw.get("per_user", True), "limits.per_user"),
    )


_AUTH_KEYS = {f.name for f in fields(AuthSettings)} - {"token_key"} | {"token_key_env"}


def _names(value: object, key: str) -> tuple[str, ...]:
    """A list of strings; from the environment, a comma-separated string."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return tuple(value)


def _patterns(value: object, key: str, upstreams: tuple[UpstreamSettings, ...]) -> tuple[str, ...]:
    patterns = _names(value, key)
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        first = compile_pattern(pattern.split("/", 1)[0] + "/x")
        if not any(first.fullmatch(f"{u.name}/x") for u in upstreams):
            raise ConfigError(key, f"{pattern!r} names no configured upstream")
    return patterns


def _access(
    raw: Mapping[str, Any], upstreams: tuple[UpstreamSettings, ...]
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]], tuple[Rule, ...] | None]:
    anonymous = _patterns(raw.get("anonymous", []), "auth.anonymous", upstreams)
    groups = {
        str(name): _names(members, f"auth.groups.{name}")
        for name, members in _table(raw.get("groups", {}), "auth.groups").items()
    }
    if "rules" not in raw:
        return anonymous, groups, None
    if not isinstance(raw["rules"], list):
        raise ConfigError("auth.rules", "expected [[auth.rules]] tables")
    rules = []
    for i, entry in enumerate(raw["rules"]):
        key = f"auth.rules[{i}]"
        entry = _table(entry, key)
        _check_keys(entry, {"users", "repositories"}, f"{key}.")
        users = _names(entry.get("users"), f"{key}.users")
        for who in users:
            if who.startswith("group:") and who.removeprefix("group:") not in groups:
                raise ConfigError(f"{key}.users", f"{who!r}: no such group in auth.groups")
        repositories = _patterns(entry.get("repositories"), f"{key}.repositories", upstreams)
        rules.append(Rule(users, repositories))
    return anonymous, groups, tuple(rules)


def _auth(
    raw: Mapping[str, Any], environ: Mapping[str, str], upstreams: tuple[UpstreamSettings, ...]
) -> AuthSettings:
    _check_keys(raw, _AUTH_KEYS, "auth.")
    anonymous, groups, rules = _access(raw, upstreams)
    d = AuthSettings()
    htpasswd = None
    if raw.get("htpasswd"):
        htpasswd = Path(_str(raw["htpasswd"], "auth.htpasswd"))
        if not htpasswd.is_file():
            raise ConfigError("auth.htpasswd", f"no such file {str(htpasswd)!r}")
    elif anonymous or rules is not None or raw.get("admins"):
        raise ConfigError("auth.htpasswd", "access rules need client authentication (a file)")
    token_key = None
    if "token_key_env" in raw:
        variable = _str(raw["token_key_env"], "auth.token_key_env")
        token_key = environ.get(variable) or None
        if token_key is None:
            raise ConfigError("auth.token_key_env", f"the environment variable {variable} is unset")
        if len(token_key) < 32:
            raise ConfigError("auth.token_key_env", f"{variable} must hold at least 32 characters")
    token_realm = raw.get("token_realm") or None
    if token_realm is not None:
        parts = urlsplit(_str(token_realm, "auth.token_realm"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("auth.token_realm", f"expected an http(s) URL, got {token_realm!r}")
    for name in ("realm", "service"):
        value = _str(raw.get(name, getattr(d, name)), f"auth.{name}")
        if '"' in value or "\\" in value or not value.isprintable():
            raise ConfigError(f"auth.{name}", "must be printable, without quotes or backslashes")
    for name in ("token_ttl", "refresh_token_ttl", "failed_login_window"):
        if name in raw and parse_duration(raw[name], f"auth.{name}") < 1:
            raise ConfigError(f"auth.{name}", "must be at least one second")
    return AuthSettings(
        htpasswd=htpasswd,
        realm=_str(raw.get("realm", d.realm), "auth.realm"),
        tokens=_bool(raw.get("tokens", d.tokens), "auth.tokens"),
        service=_str(raw.get("service", d.service), "auth.service"),
        token_realm=token_realm,
        token_ttl=parse_duration(raw.get("token_ttl", d.token_ttl), "auth.token_ttl"),
        refresh_token_ttl=parse_duration(
            raw.get("refresh_token_ttl", d.refresh_token_ttl), "auth.refresh_token_ttl"
        ),
        token_key=token_key,
        failed_logins=_int(
            raw.get("failed_logins", d.failed_logins), "auth.failed_logins", minimum=1
        ),
        failed_login_window=parse_duration(
            raw.get("failed_login_window", d.failed_login_window), "auth.failed_login_window"
        ),
        anonymous=anonymous,
        groups=groups,
        rules=rules,
        admins=_names(raw.get("admins", []), "auth.admins"),
    )


def load(path: Path, environ: Mapping[str, str]) -> Settings:
    """Read and validate a config file; raise ConfigError on any problem."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(str(path), exc.strerror or str(exc)) from exc
    return parse(data, environ)
