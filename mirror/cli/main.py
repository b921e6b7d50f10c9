"""The ``mirror`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, Settings, UpstreamSettings, load, parse_workers
from ..errors import Denied, OCIError, UpstreamRefused
from ..logs import configure_logging
from ..manifest import MANIFEST_TYPES
from ..reference import ImageReference, parse_image_reference
from ..storage.locks import FileLock
from ..web.tls import CertificateFiles

# Nothing here imports prometheus-client (through .upstream, .metrics, .service or
# .app) at module level: it picks its multiprocess mode when first imported, and
# `mirror serve` must set PROMETHEUS_MULTIPROC_DIR before that.
from .admin import add_commands

if TYPE_CHECKING:
    from ..layout import Plan
    from ..service import PullThroughCache
    from ..warm import WarmSummary

__all__ = ["main"]

# The cache holds what the upstream credentials opened: files 0600, directories 0700,
# whatever creates them (SQLite, diskcache, prometheus-client, tar files).
_UMASK = 0o077


class UsageError(Exception):
    """The command line asks for something impossible; the message says what."""


def _settings(args: argparse.Namespace) -> Settings:
    settings = load(Path(args.config), os.environ)
    server = settings.server
    for flag in ("host", "port"):
        value = getattr(args, flag, None)
        if value is not None:
            server = dataclasses.replace(server, **{flag: value})
    if getattr(args, "workers", None) is not None:
        server = dataclasses.replace(server, workers=parse_workers(args.workers, "--workers"))
    cache = settings.cache
    if getattr(args, "offline", False):
        cache = dataclasses.replace(cache, offline=True)
    return dataclasses.replace(settings, server=server, cache=cache)


def _raise_open_file_limit() -> None:
    """Soft limit up to the hard one: each download, reader and client holds
    descriptors, and distributions still start services at a soft 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..web.server import bind_address, serve, uvicorn_options

    settings = _settings(args)
    try:
        settings.cache.directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = f"cannot create {settings.cache.directory}: {exc.strerror}"
        raise ConfigError("cache.directory", reason) from exc
    if not os.access(settings.cache.directory, os.W_OK):
        raise ConfigError("cache.directory", f"{settings.cache.directory} is not writable")
    with contextlib.suppress(OSError):  # a directory made by older versions: 0755
        settings.cache.directory.chmod(0o700)
    configure_logging(settings.server.log_level, settings.server.log_format)
    tls = CertificateFiles.from_settings(settings.server)
    if tls is not None:
        tls.check()
    # Worker processes rebuild the app from the same file and environment, so the
    # flags that matter to the app travel as the environment overrides they equal.
    os.environ["MIRROR_CONFIG"] = str(Path(args.config).resolve())
    if settings.cache.offline:
        os.environ["MIRROR_CACHE_OFFLINE"] = "true"
    sock = bind_address(settings.server.host, settings.server.port, workers=settings.server.workers)
    metrics_lock = _prepare_multiprocess_metrics(settings)
    _raise_open_file_limit()  # before the workers start: they inherit it
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.server.host,
        "port": settings.server.port,
        "workers": settings.server.workers,
        "log_level": settings.server.log_level,
        "log_config": None,  # ours, set in each worker by the app factory
        "access_log": False,  # mirror.access logs each request with its cache result
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": 5,
        **uvicorn_options(settings.server),
        "ssl_context_factory": tls.listening_context if tls is not None else None,
    }
    config = uvicorn.Config("mirror.cli.main:app_from_environment", **options)
    try:
        serve(config, sock, "https" if tls is not None else "http")
    finally:
        if metrics_lock is not None:
            metrics_lock.release()  # the next start clears the files
    return 0


def _prepare_multiprocess_metrics(settings: Settings) -> FileLock | None:
    """With several workers, or a metrics listener apart from them, every worker counts
    into files that a scrape adds up (prometheus-client's multiprocess mode). One
    worker alone counts in memory: a file write per count was 5% of a warm request's
    instructions.

    The files go in a directory of this server's own under the cache's ``metrics/``,
    held by the lock returned while it serves: another server on the same cache (a
    second start by mistake, a new version started beside the old) leaves them alone,
    and each start clears what servers that died left there."""
    root = settings.cache.directory / "metrics"
    _clear_dead_metrics(root)
    if settings.server.workers == 1 and settings.server.metrics_address is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return None
    while not (lock := FileLock(root / f"{secrets.token_hex(4)}.lock")).try_acquire():
        pass
    directory = lock.path.with_suffix("")
    directory.mkdir()
    # Read by prometheus-client when it is first imported, which is after this.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    if settings.server.metrics_address:
        from prometheus_client import start_http_server

        from ..metrics import Metrics
        from ..storage.disk import Store

        host, _, port = settings.server.metrics_address.rpartition(":")
        store = Store(settings.cache.directory, settings.cache.max_size)
        try:
            start_http_server(int(port), host, registry=Metrics(store.facts).scrape_registry())
        except OSError as exc:
            lock.release()
            shutil.rmtree(directory, ignore_errors=True)
            where = settings.server.metrics_address
            raise ConfigError(
                "server.metrics_address", f"cannot listen on {where}: {exc.strerror}"
            ) from exc
    return lock


def _clear_dead_metrics(root: Path) -> None:
    """Remove the metrics directories no live server holds (a server takes its lock
    before it makes its directory), and the files of versions that counted straight
    into ``metrics/``."""
    root.mkdir(exist_ok=True)
    for path in root.iterdir():
        if path.suffix == ".lock":
            lock = FileLock(path)
            if lock.try_acquire():
                shutil.rmtree(path.with_suffix(""), ignore_errors=True)
                lock.release(remove=True)
        elif path.suffix == ".db":
            path.unlink(missing_ok=True)
        elif not path.with_suffix(".lock").exists():  # its lock goes after it
            shutil.rmtree(path, ignore_errors=True)


def app_from_environment() -> object:
    """The app factory uvicorn calls in each worker."""
    from ..web.app import create_app

    os.umask(_UMASK)  # also when uvicorn is started on this factory by hand
    settings = load(Path(os.environ["MIRROR_CONFIG"]), os.environ)
    configure_logging(settings.server.log_level, settings.server.log_format)
    return create_app(settings)


async def _check_one(settings: UpstreamSettings) -> tuple[bool, str]:
    """One line on one upstream: reachable, authenticated, rate-limit headroom."""
    from ..upstream.client import Upstream

    upstream = Upstream(dataclasses.replace(settings, retries=0))
    who = f"as {settings.username}" if settings.username else "anonymously"
    try:
        await upstream.ping()
        if upstream.settings.official_prefix:
            # Docker's documented way to read the pull limit without spending a pull.
            with contextlib.suppress(OCIError):
                await upstream.head_manifest("ratelimitpreview/test", "latest", MANIFEST_TYPES)
    except (UpstreamRefused, Denied) as exc:
        return False, f"reachable, but authentication {who} failed: {exc.message}"
    except OCIError as exc:
        return False, f"not usable: {exc.message}"
    finally:
        await upstream.aclose()
    verdict = f"reachable, auth OK ({who})"
    limit = upstream.rate_limit
    if limit.limit is not None:
        verdict += f", rate limit {limit.remaining}/{limit.limit} pulls left"
    return True, verdict


def _check_upstreams(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def check_all() -> list[tuple[bool, str]]:
        return list(await asyncio.gather(*(_check_one(u) for u in settings.upstreams)))

    results = asyncio.run(check_all())
    width = max(len(u.name) for u in settings.upstreams)
    for upstream, (ok, verdict) in zip(settings.upstreams, results, strict=True):
        print(f"{'ok  ' if ok else 'FAIL'} {upstream.name:<{width}}  {upstream.url}  {verdict}")
    return 0 if all(ok for ok, _ in results) else 1


def _healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the mirror on this host answers ``/healthz``: the container's check."""
    import http.client
    import ssl
    import urllib.request

    server = _settings(args).server
    context = None
    scheme = "http"
    if server.tls_certificate is not None:
        # The certificate names the host clients use, not 127.0.0.1: this check is
        # about the process answering, not about trust.
        scheme, context = "https", ssl._create_unverified_context()
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    host = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{host}:{server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as response:
            status = int(response.status)
    except (OSError, http.client.HTTPException) as exc:
        print(f"mirror: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


def _references(args: argparse.Namespace) -> list[ImageReference]:
    texts = list(args.references)
    if getattr(args, "file", None):
        lines = Path(args.file).read_text().splitlines()
        texts += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not texts:
        raise UsageError("name at least one image reference (or a file of them with -f)")
    references = []
    for text in texts:
        try:
            references.append(parse_image_reference(text))
        except OCIError as exc:
            raise UsageError(f"{text!r} is not an image reference: {exc.message}") from exc
    return references


def _open_cache(args: argparse.Namespace, *, offline: bool = False) -> PullThroughCache:
    from ..service import PullThroughCache

    settings = _settings(args)
    if offline:
        settings = dataclasses.replace(
            settings, cache=dataclasses.replace(settings.cache, offline=True)
        )
    configure_logging("warning", settings.server.log_format)
    return PullThroughCache.from_settings(settings)


def _report(failures: list[tuple[str, str]]) -> int:
    for reference, reason in failures:
        print(f"mirror: {reference}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def _warm(args: argparse.Namespace) -> int:
    from ..images import parse_platform
    from ..warm import warm

    references = _references(args)
    try:
        platforms = [parse_platform(p) for p in args.platform] if args.platform else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    cache = _open_cache(args)

    async def run() -> WarmSummary:
        try:
            return await warm(cache, references, platforms, args.concurrency)
        finally:
            await cache.aclose()
            cache.store.close()

    summary = asyncio.run(run())
    print(summary)
    return _report(summary.failures)


def _export(args: argparse.Namespace) -> int:
    from ..layout import LayoutError, export_layout, plan_export

    references = _references(args)
    cache = _open_cache(args, offline=True)

    async def plan() -> Plan:
        try:
            return await plan_export(cache, references)
        finally:
            await cache.aclose()

    try:
        export_plan = asyncio.run(plan())
        export_layout(cache, export_plan, Path(args.output))
    except (LayoutError, OCIError) as exc:
        print(f"mirror: export failed: {exc}", file=sys.stderr)
        return 1
    finally:
        cache.store.close()
    for skipped in export_plan.skipped:
        print(f"mirror: not cached, left out: {skipped}", file=sys.stderr)
    size = sum(export_plan.blobs.values())
    print(
        f"exported {len(references)} images, {len(export_plan.blobs)} blobs "
        f"({size} bytes) to {args.output}"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from ..layout import LayoutError, import_layout

    repository = args.repository
    cache = _open_cache(args)
    try:
        summary = import_layout(cache, Path(args.path), repository)
        if cache.fleet is not None:  # a replica's config: on into the bucket, for every replica
            from ..replicas.publish import publish

            summary.failures += asyncio.run(publish(cache, summary.images))
    except LayoutError as exc:
        print(f"mirror: import failed: {exc}", file=sys.stderr)
        return 1
    finally:
        asyncio.run(cache.aclose())
        cache.store.close()
    for image in summary.images:
        print(f"imported {image}")
    print(
        f"{len(summary.images)} images, {summary.blobs_added} blobs added "
        f"({summary.bytes_added} bytes), {summary.blobs_present} already present"
    )
    return _report(summary.failures)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="answer the registry pull API")
    serve.add_argument("--config", default="config.toml", help="path to config.toml")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument(
        "--workers", help='worker processes, or "auto": one per usable CPU (server.workers)'
    )
    serve.add_argument("--offline", action="store_true", help="never contact any upstream")
    serve.set_defaults(run=_serve)
    check = commands.add_parser(
        "check-upstreams", help="check that every configured upstream answers and accepts us"
    )
    check.add_argument("--config", default="config.toml", help="path to config.toml")
    check.set_defaults(run=_check_upstreams)
    health = commands.add_parser("healthcheck", help="exit 0 when the local mirror answers")
    health.add_argument("--config", default="config.toml", help="path to config.toml")
    health.add_argument("--timeout", type=float, default=4.0, help="seconds to wait")
    health.set_defaults(run=_healthcheck)

    warm = commands.add_parser("warm", help="fill the cache with images ahead of time")
    warm.add_argument(
        "references", nargs="*", metavar="REF", help="e.g. debian:12, ghcr.io/org/img:1"
    )
    warm.add_argument("-f", "--file", help="a file of references, one per line")
    platforms = warm.add_mutually_exclusive_group()
    platforms.add_argument(
        "--platform", action="append", metavar="OS/ARCH", help="only these platforms of an index"
    )
    platforms.add_argument(
        "--all-platforms", action="store_true", help="every platform of an index (the default)"
    )
    warm.add_argument("--concurrency", type=int, default=4, help="blobs fetched at once")
    warm.add_argument("--config", default="config.toml", help="path to config.toml")
    warm.set_defaults(run=_warm)

    export = commands.add_parser("export", help="write cached images as an OCI layout archive")
    export.add_argument("references", nargs="+", metavar="REF")
    export.add_argument("-o", "--output", required=True, metavar="FILE.tar")
    export.add_argument("--config", default="config.toml", help="path to config.toml")
    export.set_defaults(run=_export, file=None)

    load = commands.add_parser(
        "import", help="load an OCI layout (directory or tar) into the cache"
    )
    load.add_argument("path", metavar="FILE.tar|DIR")
    load.add_argument("--repository", help="the repository for images whose ref name is a bare tag")
    load.add_argument("--config", default="config.toml", help="path to config.toml")
    load.set_defaults(run=_import)
    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.umask(_UMASK)
    configure_logging("info", "text")
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"mirror: bad configuration: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
