"""``mirror ls | inspect | purge | pin | unpin | refresh | verify``: the admin API from a shell.

With ``--url`` they ask a running mirror (credentials from ``--user`` and the
environment variable ``--password-env`` names, default ``MIRROR_PASSWORD``); with
``--config`` they open the cache directory itself (a stopped mirror, or one on
this host: the index is safe to share). Tables for people, ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import load

if TYPE_CHECKING:
    from ..admin.operations import Admin

__all__ = ["add_commands"]

_WHO = "cli"


class _Failed(Exception):
    """The mirror refused or the cache has no such thing; the message says why."""


class _Remote:
    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        auth = None
        if args.user:
            password = os.environ.get(args.password_env)
            if password is None:
                raise _Failed(f"set {args.password_env} to the password of {args.user}")
            auth = httpx.BasicAuth(args.user, password)
        self.http = httpx.Client(base_url=args.url.rstrip("/"), auth=auth, timeout=300)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _Failed(f"cannot reach the mirror: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["errors"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                message = response.text[:200]
            raise _Failed(f"{response.status_code}: {message}")
        return response.json()

    def close(self) -> None:
        self.http.close()


def _local(args: argparse.Namespace) -> Admin:
    from ..admin.operations import Admin
    from ..logs import configure_logging
    from ..service import PullThroughCache

    settings = load(Path(args.config_path), os.environ)
    configure_logging("warning", settings.server.log_format)
    return Admin(PullThroughCache.from_settings(settings))


def _await(admin: Admin, operation: Callable[[], Awaitable[Any]]) -> Any:
    """Run an operation that may reach the replicas' bucket and Redis (started for it)."""

    async def run() -> Any:
        await admin.cache.start()
        try:
            return await operation()
        finally:
            await admin.cache.aclose()

    return asyncio.run(run())


def _run(
    args: argparse.Namespace, remote: Callable[[_Remote], Any], local: Callable[[Admin], Any]
) -> Any:
    from ..errors import OCIError

    if args.url:
        client = _Remote(args)
        try:
            return remote(client)
        finally:
            client.close()
    admin = _local(args)
    try:
        return local(admin)
    except OCIError as exc:
        raise _Failed(exc.message) from None
    finally:
        admin.cache.store.close()


# commands


def _ls(args: argparse.Namespace) -> int:
    if args.repository:
        body = _run(
            args,
            lambda r: r.call("GET", "/admin/tags", params={"repository": args.repository}),
            lambda a: a.tags(args.repository),
        )
        rows = [
            [
                t["tag"],
                t["digest"][:19],
                _size(t["size"]),
                _age(t["age"]),
                t["pulls"],
                _yes(t["pinned"]),
            ]
            for t in body["tags"]
        ]
        return _print(args, body, ["TAG", "DIGEST", "SIZE", "CHECKED", "PULLS", "PINNED"], rows)
    if args.blobs:
        body = _pages(args, "/admin/blobs", "blobs", lambda a, last: a.blobs(last, 1000))
        rows = [
            [b["digest"], _size(b["size"]), _when(b["last_used"]), _yes(b["pinned"])]
            for b in body["blobs"]
        ]
        return _print(args, body, ["DIGEST", "SIZE", "LAST USED", "PINNED"], rows)
    params = {k: v for k, v in (("upstream", args.upstream), ("prefix", args.prefix)) if v}
    body = _pages(
        args,
        "/admin/repositories",
        "repositories",
        lambda a, last: a.repositories(args.upstream, args.prefix or "", last, 1000),
        params,
    )
    rows = [
        [r["name"], r["tags"], _size(r["size"]), r["pulls"], _when(r["last_pull"])]
        for r in body["repositories"]
    ]
    return _print(args, body, ["REPOSITORY", "TAGS", "SIZE", "PULLS", "LAST PULL"], rows)


def _pages(
    args: argparse.Namespace,
    path: str,
    field: str,
    local: Callable[[Admin, str | None], Any],
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every page, following ``next``."""

    def remote(client: _Remote) -> list[Any]:
        items: list[Any] = []
        last: str | None = None
        while True:
            query = {**(params or {}), "n": "1000", **({"last": last} if last else {})}
            page = client.call("GET", path, params=query)
            items += page[field]
            last = page["next"]
            if not last:
                return items

    def offline(admin: Admin) -> list[Any]:
        items: list[Any] = []
        last: str | None = None
        while True:
            page = local(admin, last)
            items += page[field]
            last = page["next"]
            if not last:
                return items

    return {field: _run(args, remote, offline)}


def _inspect(args: argparse.Namespace) -> int:
    body = _run(
        args,
        lambda r: r.call("GET", "/admin/image", params={"ref": args.reference}),
        lambda a: a.image(args.reference),
    )
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"{body['upstream']}/{body['repository']}:{body['reference']}  ({body['upstream_url']})")
    print(f"digest     {body['digest']}")
    print(f"media type {body['media_type']}")
    print(f"size       {_size(body['size'])} cached{'  (pinned)' if body['pinned'] else ''}")
    for tag in body["tags"]:
        print(f"tag record checked {_age(tag['age'])} ago; for Accept: {', '.join(tag['accepts'])}")
    print()
    rows = [
        [p["kind"], p["digest"], p["platform"] or "", _size(p["size"]), _yes(p["cached"])]
        for p in [*body["manifests"], *body["blobs"]]
    ]
    _table(["KIND", "DIGEST", "PLATFORM", "SIZE", "CACHED"], rows)
    return 0


def _purge(args: argparse.Namespace) -> int:
    kinds = [
        (k, v)
        for k, v in (
            ("tag", args.tag),
            ("repository", args.repository),
            ("upstream", args.upstream),
            ("digest", args.digest),
        )
        if v
    ]
    request: dict[str, Any] = (
        {"kind": "age", "age": args.older_than}
        if args.older_than
        else {"kind": kinds[0][0], "ref": kinds[0][1]}
    )
    body = _run(
        args,
        lambda r: r.call("POST", "/admin/purge", json=request),
        lambda a: a.purge(_WHO, request),
    )
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(
            f"purged {body['tags']} tags, {body['manifests']} manifests, {body['blobs']} blobs; "
            f"{_size(body['freed'])} freed"
        )
    return 0


def _pin(args: argparse.Namespace) -> int:
    if args.unpin:
        body = _run(
            args,
            lambda r: r.call("DELETE", "/admin/pins", params={"ref": args.reference}),
            lambda a: _await(a, lambda: a.unpin(_WHO, args.reference)),
        )
        text = f"unpinned {args.reference}"
    elif args.reference:
        body = _run(
            args,
            lambda r: r.call("POST", "/admin/pins", json={"ref": args.reference}),
            lambda a: _await(a, lambda: a.pin(_WHO, args.reference)),
        )
        text = f"pinned {args.reference} ({body['digest']}, {_size(body['size'])})"
    else:
        body = _run(args, lambda r: r.call("GET", "/admin/pins"), lambda a: _await(a, a.pins))
        rows = [
            [f"{p['upstream']}/{p['repository']}", p["reference"], p["digest"]]
            for p in body["pins"]
        ]
        return _print(args, body, ["REPOSITORY", "REFERENCE", "DIGEST"], rows)
    print(json.dumps(body, indent=2) if args.json else text)
    return 0


def _refresh(args: argparse.Namespace) -> int:
    async def offline(admin: Admin) -> Any:
        try:
            return await admin.refresh(_WHO, args.reference)
        finally:
            await admin.cache.aclose()

    body = _run(
        args,
        lambda r: r.call("POST", "/admin/refresh", json={"ref": args.reference}),
        lambda a: asyncio.run(offline(a)),
    )
    text = f"{args.reference} is {body['digest']} ({body['result']})"
    print(json.dumps(body, indent=2) if args.json else text)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..admin.integrity import Progress

    def remote(client: _Remote) -> Any:
        body = client.call("POST", "/admin/verify", json={"rate": args.rate})
        while not body["done"]:
            time.sleep(0.5)  # a background job on the mirror: ask how far it got
            body = client.call("GET", "/admin/verify")
        return body

    body = _run(args, remote, lambda a: a.verify(_WHO, Progress()))
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        for key in body["corrupt"]:
            print(f"corrupt, dropped: {key}")
        print(
            f"checked {body['checked']} entries ({_size(body['bytes'])}), "
            f"{len(body['corrupt'])} corrupt"
        )
    return 1 if body["corrupt"] else 0


# output


def _print(args: argparse.Namespace, body: Any, header: list[str], rows: list[list[Any]]) -> int:
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        _table(header, rows)
    return 0


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def _yes(flag: bool) -> str:
    return "yes" if flag else ""


# the parser


def _target(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running mirror, e.g. http://127.0.0.1:5000")
    where.add_argument(
        "--config", dest="config_path", default="config.toml", help="the cache of this config.toml"
    )
    parser.add_argument("--user", help="an admin user (auth.admins) of the mirror at --url")
    parser.add_argument(
        "--password-env",
        default="MIRROR_PASSWORD",
        metavar="VAR",
        help="the environment variable holding --user's password",
    )
    parser.add_argument("--json", action="store_true", help="JSON for scripts")


def add_commands(commands: Any) -> None:
    """Add the admin commands to ``mirror``'s sub-command parser."""
    ls = commands.add_parser("ls", help="list cached repositories, a repository's tags, or blobs")
    ls.add_argument("repository", nargs="?", help="list this repository's tags")
    ls.add_argument("--upstream", help="only this upstream's repositories")
    ls.add_argument("--prefix", help="only names starting so (upstream/repository)")
    ls.add_argument("--blobs", action="store_true", help="list cached blobs")
    _target(ls)
    ls.set_defaults(run=_wrap(_ls))

    inspect = commands.add_parser("inspect", help="one cached image: manifests, platforms, blobs")
    inspect.add_argument("reference", metavar="REF")
    _target(inspect)
    inspect.set_defaults(run=_wrap(_inspect))

    purge = commands.add_parser("purge", help="delete cached content; the next pull refetches it")
    what = purge.add_mutually_exclusive_group(required=True)
    what.add_argument("--tag", metavar="REF", help="a tag (its blobs no other image uses go too)")
    what.add_argument("--repository", metavar="NAME", help="every tag of a repository")
    what.add_argument("--upstream", metavar="NAME", help="everything from an upstream")
    what.add_argument("--digest", metavar="DIGEST", help="one manifest or blob")
    what.add_argument(
        "--older-than", metavar="AGE", help="whatever was not used for AGE (e.g. 30d)"
    )
    _target(purge)
    purge.set_defaults(run=_wrap(_purge))

    for name, unpin in (("pin", False), ("unpin", True)):
        pin = commands.add_parser(
            name,
            help="keep an image through eviction (no REF: list pins)"
            if not unpin
            else "let a pinned image be evicted again",
        )
        pin.add_argument("reference", metavar="REF", nargs="?" if not unpin else None)
        _target(pin)
        pin.set_defaults(run=_wrap(_pin), unpin=unpin)

    refresh = commands.add_parser("refresh", help="ask the upstream what a tag is now")
    refresh.add_argument("reference", metavar="REF")
    _target(refresh)
    refresh.set_defaults(run=_wrap(_refresh))

    verify = commands.add_parser(
        "verify", help="re-hash every cached blob and manifest; drop the corrupt; exit 1 if any"
    )
    verify.add_argument("--rate", default="50MiB", help="bytes a second on a live mirror (--url)")
    _target(verify)
    verify.set_defaults(run=_wrap(_verify))


def _wrap(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except _Failed as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 1

    return run
