"""Two (or more) builds of the mirror on the same warm cache, measured in turns.

``python -m bench.ab --variant main=/path/to/checkout --variant this=. [--loads ...]``
(from the repository root, after ``scripts/install test``). Each variant is a source tree
whose ``mirror`` package is run as ``python -m mirror serve`` (``PYTHONPATH=<tree>``) with
this venv's libraries; a variant may add environment variables (``--env NAME:KEY=VALUE``)
or a uvicorn worker count (``--workers``). The cache is built offline, as ``bench.scale``
builds it (no upstream: every request is a hit): 4 repositories, each a tag, its manifest
and a 1 KiB config blob, the tag recorded for both ``Accept`` lists the mixed load sends,
and one 64 MiB layer.

The loads (``--loads``, default all but the 1,000-connection one):

- ``mix100``, ``mix100single``, ``mix1000``: bench step 7's mixed load (manifests by tag and
  by digest, config blobs) from 100 connections with the 4 manifest types in ``Accept``,
  with only the manifest's own type, and from 1,000 connections;
- ``small100``: GETs of the 1 KiB config blobs only, 100 connections;
- ``blob1``, ``blob8``: the 64 MiB layer with curl to /dev/null, 1 stream (4 downloads in a
  row) and 8 streams (2 each), as bench step 5.

On a shared machine absolute figures drift with the other load; the point is the ratios
within one run: each load runs ``--rounds`` times per variant, the variants taking turns
(A B A B), and the load average is kept with every run. Before each run every variant must
have been quiet (no byte read or written) for a second: after 1,000 connections a server
goes on answering abandoned requests. ``--pin`` puts the load generators on CPU 0 and the
mirror on CPU 1 (``taskset``). ``--profile DIR`` samples each variant with py-spy during
one extra run of each wrk load. Results go to ``bench/results/ab.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mirror.manifest import MANIFEST_TYPES, OCI_MANIFEST
from mirror.storage.disk import Store
from tests.support.ports import free_port, wait_http_ok

from .load import blob_throughput, run_wrk_mix
from .procs import tree_cpu_seconds, wait_quiet
from .profile import py_spy, summarize
from .scale import _MODE_BINARY, _MODE_PICKLE, _manifest

MiB = 1024 * 1024
LAYER = 64 * MiB
REPOSITORIES = 4
LOADS = ("mix100", "mix100single", "small100", "blob1", "blob8", "mix1000")
DEFAULT_LOADS = ("mix100", "mix100single", "small100", "blob1", "blob8")


class Cache:
    """The warm cache's requests; ``build`` writes files and index rows as the mirror does."""

    def __init__(self) -> None:
        self.configs = [hashlib.sha512(b"config %d" % i).digest() * 16 for i in range(4)]
        self.layer = os.urandom(LAYER)
        self.layer_digest = "sha256:" + hashlib.sha256(self.layer).hexdigest()

    def _config_digest(self, i: int) -> str:
        return "sha256:" + hashlib.sha256(self.configs[i]).hexdigest()

    def _manifest(self, i: int) -> bytes:
        """Repository 0's manifest lists the layer (a repository serves what it holds)."""
        body = json.loads(_manifest(i, self._config_digest(i)))
        if i == 0:
            body["layers"] = [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                               "digest": self.layer_digest, "size": LAYER}]  # fmt: skip
        return json.dumps(body).encode()

    def _manifest_digest(self, i: int) -> str:
        return "sha256:" + hashlib.sha256(self._manifest(i)).hexdigest()

    def build(self, directory: Path) -> None:
        Store(directory, 1 << 50).close()
        rows: list[tuple[Any, ...]] = []
        now = time.time()
        blobs = [*self.configs, self.layer]
        for n, data in enumerate(blobs):
            hexdigest = hashlib.sha256(data).hexdigest()
            folder = directory / "blobs" / "sha256" / hexdigest[:2]
            folder.mkdir(parents=True, exist_ok=True)
            filename = f"blobs/sha256/{hexdigest[:2]}/{hexdigest}.{n:08x}"
            (directory / filename).write_bytes(data)
            rows.append(
                (f"blob:sha256:{hexdigest}", now, now, len(data), _MODE_BINARY, filename, None)
            )
        for i in range(REPOSITORIES):
            body = self._manifest(i)
            digest = self._manifest_digest(i)
            value = _pickle((OCI_MANIFEST, body))
            rows.append((f"manifest:{digest}", now, now, 0, _MODE_PICKLE, None, value))
            record = _pickle((tuple(digest.split(":", 1)), OCI_MANIFEST, now))
            for accept in (",".join(MANIFEST_TYPES), OCI_MANIFEST):
                key = f"tag:docker.io/ab/r{i}:1|{accept}"
                rows.append((key, now, now, 0, _MODE_PICKLE, None, record))
        with sqlite3.connect(directory / "cache.db") as db:
            db.executemany(
                "INSERT INTO Cache (key, raw, store_time, expire_time, access_time,"
                " access_count, tag, size, mode, filename, value)"
                " VALUES (?, 1, ?, NULL, ?, 0, NULL, ?, ?, ?, ?)",
                rows,
            )
        db.close()

    def mixed(self, single: bool) -> list[tuple[str, dict[str, str]]]:
        accept = {"Accept": OCI_MANIFEST if single else ", ".join(MANIFEST_TYPES)}
        requests: list[tuple[str, dict[str, str]]] = []
        for i in range(REPOSITORIES):
            requests.append((f"/v2/ab/r{i}/manifests/1", accept))
            requests.append((f"/v2/ab/r{i}/manifests/{self._manifest_digest(i)}", accept))
            requests.append((f"/v2/ab/r{i}/blobs/{self._config_digest(i)}", {}))
        return requests

    def small(self) -> list[tuple[str, dict[str, str]]]:
        return [(f"/v2/ab/r{i}/blobs/{self._config_digest(i)}", {}) for i in range(REPOSITORIES)]


def _pickle(value: object) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


class Variant:
    """One build of the mirror serving its own copy of the warm cache."""

    def __init__(
        self, name: str, tree: Path, env: dict[str, str], work: Path, workers: int, pin: bool
    ) -> None:
        self.name, self.tree, self.extra_env = name, tree.resolve(), env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = work / name
        self.work.mkdir()
        self.config = self.work / "mirror.toml"
        self.log = self.work / "mirror.log"
        self.workers, self.pin = workers, pin
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, cache: Path) -> None:
        directory = self.work / "cache"
        shutil.copytree(cache, directory)
        self.config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nworkers = {self.workers}\n'
            f'log_level = "warning"\n[cache]\ndirectory = {json.dumps(str(directory))}\n'
            'max_size = "20GiB"\noffline = true\n[[upstreams]]\n'
            'name = "docker.io"\nurl = "http://127.0.0.1:9"\ntag_ttl = "1h"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        env["PYTHONPATH"] = str(self.tree)
        env.update(self.extra_env)
        argv = [sys.executable, "-m", "mirror", "serve", "--config", str(self.config)]
        if self.pin:
            argv = ["taskset", "-c", "1", *argv]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.work,
            )  # fmt: skip
        wait_http_ok(f"{self.url}/v2/", timeout=120, process=self.process,
                     stderr_path=self.log, name=self.name)  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wrk(url: str, requests: list[tuple[str, dict[str, str]]], connections: int,
         seconds: float, work: Path, pin: bool) -> dict[str, Any]:  # fmt: skip
    run = run_wrk_mix(url, requests, threads=2, connections=connections, seconds=seconds,
                      workdir=work, cpus="0" if pin else None)  # fmt: skip
    return {
        "rps": round(run.requests_per_second),
        "p50_ms": run.p50_ms,
        "p90_ms": run.p90_ms,
        "p99_ms": run.p99_ms,
        "max_ms": run.max_ms,
        "errors": sum(run.errors.values()),
        "requests": run.requests,
    }


def measure(load: str, variant: Variant, cache: Cache, args: argparse.Namespace,
            work: Path) -> dict[str, Any]:  # fmt: skip
    """The load's figures, with the mirror's CPU time per request or per GB: on a shared
    machine that is steadier than the rates."""
    cpu = tree_cpu_seconds(variant.pid)
    figures = _measure(load, variant, cache, args, work)
    cpu = tree_cpu_seconds(variant.pid) - cpu
    if "mb_s" in figures:
        figures["cpu_s_per_gb"] = round(cpu / (figures.pop("bytes") / 1e9), 3)
    else:
        figures["cpu_us_per_request"] = round(cpu / max(figures.pop("requests"), 1) * 1e6)
    return figures


def _measure(load: str, variant: Variant, cache: Cache, args: argparse.Namespace,
             work: Path) -> dict[str, Any]:  # fmt: skip
    if load.startswith("blob"):
        streams = 1 if load == "blob1" else 8
        rounds = 4 if streams == 1 else 2
        run = blob_throughput(
            f"{variant.url}/v2/ab/r0/blobs/{cache.layer_digest}", {}, LAYER,
            streams=streams, rounds=rounds, cpus="0" if args.pin else None,
        )  # fmt: skip
        return {"mb_s": round(run.mb_per_second), "bytes": run.bytes}
    requests = cache.small() if load == "small100" else cache.mixed(load == "mix100single")
    connections = 1000 if load == "mix1000" else 100
    return _wrk(variant.url, requests, connections, args.seconds, work, args.pin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=TREE")
    parser.add_argument("--env", action="append", default=[], metavar="NAME:KEY=VALUE")
    parser.add_argument("--loads", default=",".join(DEFAULT_LOADS),
                        help=f"comma-separated, of {', '.join(LOADS)}")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8, help="each wrk run (default: 8)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pin", action="store_true", help="clients on CPU 0, mirror on CPU 1")
    parser.add_argument("--profile", type=Path, help="py-spy profiles of each variant here")
    parser.add_argument("--json", type=Path, default=Path("bench/results/ab.json"))
    args = parser.parse_args(argv)
    loads = [load for load in args.loads.split(",") if load]
    unknown = set(loads) - set(LOADS)
    if unknown:
        parser.error(f"unknown loads: {', '.join(sorted(unknown))}")
    cache = Cache()
    results: dict[str, Any] = {"variants": {}, "runs": [], "argv": sys.argv[1:]}
    with tempfile.TemporaryDirectory(prefix="mirror-ab-") as tmp:
        work = Path(tmp)
        cache.build(work / "cache")
        variants: list[Variant] = []
        for spec in args.variant:
            name, _, tree = spec.partition("=")
            env = dict(
                e.split(":", 1)[1].split("=", 1) for e in args.env if e.split(":", 1)[0] == name
            )
            variants.append(Variant(name, Path(tree), env, work, args.workers, args.pin))
            results["variants"][name] = {"tree": tree, "env": env, "commit": _commit(tree)}
        try:
            for variant in variants:
                variant.start(work / "cache")
                for load in loads:  # warm-up: memory, connections, files in the page cache
                    if not load.startswith("blob"):
                        measure(load, variant, cache, argparse.Namespace(**{
                            **vars(args), "seconds": 1}), work)  # fmt: skip
            for round_number in range(args.rounds):
                for load in loads:
                    for variant in variants if round_number % 2 == 0 else variants[::-1]:
                        # a server still answering the last run's abandoned requests (after
                        # 1,000 connections) would load this one
                        for other in variants:
                            wait_quiet(other.pid)
                        before = os.getloadavg()[0]
                        figures = measure(load, variant, cache, args, work)
                        row = {"load": load, "variant": variant.name, "round": round_number,
                               "loadavg": round(before, 1), **figures}  # fmt: skip
                        results["runs"].append(row)
                        print(json.dumps(row), flush=True)
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                for variant in variants:
                    for load in (x for x in loads if not x.startswith("blob")):
                        out = args.profile / f"{variant.name}-{load}.txt"
                        with py_spy(variant.pid, out):
                            measure(load, variant, cache, args, work)
                        samples, functions = summarize(out)
                        print(f"profile {variant.name} {load} ({samples} samples): incl / self")
                        for function, inclusive, own in functions:
                            print(f"  {inclusive:6.1%} {own:6.1%}  {function[:110]}")
        finally:
            for variant in variants:
                variant.stop()
    results["summary"] = _summary(results["runs"], [v.name for v in variants])
    print(json.dumps(results["summary"], indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _summary(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per load and variant, the median of each figure over the rounds; and each variant's
    ratio to the first one."""
    summary: dict[str, Any] = {}
    for load in dict.fromkeys(r["load"] for r in runs):
        per: dict[str, dict[str, float]] = {}
        for name in names:
            mine = [r for r in runs if r["load"] == load and r["variant"] == name]
            keys = [k for k in mine[0] if k not in ("load", "variant", "round")]
            per[name] = {k: sorted(r[k] for r in mine)[len(mine) // 2] for k in keys}
        first = per[names[0]]
        for name in names[1:]:
            per[name]["vs_" + names[0]] = {
                k: round(v / first[k], 2) if first[k] else None
                for k, v in per[name].items()
                if k in ("rps", "mb_s", "p99_ms", "max_ms", "cpu_us_per_request", "cpu_s_per_gb")
            }
        summary[load] = per
    return summary


def _commit(tree: str) -> str | None:
    result = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    return result.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
