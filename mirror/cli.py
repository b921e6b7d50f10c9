"""The ``mirror`` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, Settings, load
from .logs import configure_logging

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> Settings:
    settings = load(Path(args.config), os.environ)
    server = settings.server
    for flag in ("host", "port", "workers"):
        value = getattr(args, flag, None)
        if value is not None:
            server = dataclasses.replace(server, **{flag: value})
    cache = settings.cache
    if getattr(args, "offline", False):
        cache = dataclasses.replace(cache, offline=True)
    return dataclasses.replace(settings, server=server, cache=cache)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings(args)
    try:
        settings.cache.directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = f"cannot create {settings.cache.directory}: {exc.strerror}"
        raise ConfigError("cache.directory", reason) from exc
    if not os.access(settings.cache.directory, os.W_OK):
        raise ConfigError("cache.directory", f"{settings.cache.directory} is not writable")
    configure_logging(settings.server.log_level, settings.server.log_format)
    # Worker processes rebuild the app from the same file and environment, so the
    # flags that matter to the app travel as the environment overrides they equal.
    os.environ["MIRROR_CONFIG"] = str(Path(args.config).resolve())
    if settings.cache.offline:
        os.environ["MIRROR_CACHE_OFFLINE"] = "true"
    _prepare_multiprocess_metrics(settings)
    uvicorn.run(
        "mirror.cli:app_from_environment",
        factory=True,
        host=settings.server.host,
        port=settings.server.port,
        workers=settings.server.workers,
        log_level=settings.server.log_level,
        log_config=None,  # ours, set in each worker by the app factory
        access_log=False,  # mirror.access logs each request with its cache result
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    return 0


def _prepare_multiprocess_metrics(settings: Settings) -> None:
    """Every worker counts into files that a scrape adds up (prometheus-client's
    multiprocess mode); they start empty with each server."""
    directory = settings.cache.directory / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    # Read by prometheus-client when it is first imported, which is after this.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    if settings.server.metrics_address:
        from prometheus_client import start_http_server

        from .metrics import Metrics
        from .store import Store

        host, _, port = settings.server.metrics_address.rpartition(":")
        store = Store(settings.cache.directory, settings.cache.max_size)
        start_http_server(int(port), host, registry=Metrics(store.facts).scrape_registry())


def app_from_environment() -> object:
    """The app factory uvicorn calls in each worker."""
    from .app import create_app

    settings = load(Path(os.environ["MIRROR_CONFIG"]), os.environ)
    configure_logging(settings.server.log_level, settings.server.log_format)
    return create_app(settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="answer the registry pull API")
    serve.add_argument("--config", default="config.toml", help="path to config.toml")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (server.workers)")
    serve.add_argument("--offline", action="store_true", help="never contact any upstream")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"mirror: bad configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
