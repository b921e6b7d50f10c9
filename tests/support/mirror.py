"""``mirror serve`` as a real subprocess, on a free port, with a generated config."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.ports import LoopbackService, Service, free_port, wait_http_ok


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(
    path: Path,
    *,
    port: int,
    cache_dir: Path,
    upstreams: list[dict[str, Any]],
    workers: int = 1,
    extra_toml: str = "",
    server: dict[str, Any] | None = None,
    **cache: Any,
) -> None:
    """``extra_toml`` is appended as is: tables of other sections (``[auth]``, …)."""
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f"workers = {workers}",
        'log_level = "info"',
        *(f"{key} = {_toml_value(value)}" for key, value in (server or {}).items()),
        "[cache]",
        f"directory = {_toml_value(cache_dir)}",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in cache.items()]
    for upstream in upstreams:
        lines.append("[[upstreams]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in upstream.items()]
    path.write_text("\n".join(lines) + "\n" + extra_toml)


class MirrorProcess(LoopbackService, Service):
    """Starts ``python -m mirror serve``; stops it (gracefully or with kill -9).

    ``server`` adds keys to the ``[server]`` table; with ``tls_certificate`` among them the
    mirror answers HTTPS, and ``client_tls`` (trusting the CA that signed its certificate) is
    how its readiness is checked.
    """

    def __init__(
        self,
        upstreams: list[dict[str, Any]],
        *,
        cache_dir: Path | None = None,
        workers: int = 1,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        extra_toml: str = "",
        server: dict[str, Any] | None = None,
        client_tls: ssl.SSLContext | None = None,
        **cache: Any,
    ) -> None:
        # A workdir passed in belongs to the caller (e.g. pytest's tmp_path) and stays.
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mirror-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir or self.workdir / "cache"
        self.port = free_port()
        self.config_path = self.workdir / "config.toml"
        write_config(
            self.config_path,
            port=self.port,
            cache_dir=self.cache_dir,
            upstreams=upstreams,
            workers=workers,
            extra_toml=extra_toml,
            server=server,
            **cache,
        )
        self.tls = bool(server and server.get("tls_certificate"))
        self.client_tls = client_tls
        self.log_path = self.workdir / "mirror.log"
        self.extra_args = extra_args
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        # A command line the server is started through (e.g. a namespace of its own).
        self.wrapper: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> MirrorProcess:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        environ.update(self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    "mirror",
                    "serve",
                    "--config",
                    str(self.config_path),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                start_new_session=True,
            )
        wait_http_ok(
            f"{self.url}/v2/",
            timeout=30,
            process=self.process,
            stderr_path=self.log_path,
            name="mirror",
            verify=self.client_tls or True,
        )
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            # The whole group: with --workers, uvicorn's children go too.
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def wait_fills_settled(self, timeout: float = 60) -> None:
        """Until no fill is under way: a client can be done before its fill is adopted."""
        deadline = time.monotonic() + timeout
        while "\nmirror_fills_in_flight 0.0" not in httpx.get(f"{self.url}/metrics").text:
            if time.monotonic() > deadline:
                raise TimeoutError("fills still in flight")

    def close(self) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def pids(self) -> list[int]:
        """The server process and its worker children."""
        if self.process is None:
            return []
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        return pids

    def spawned_workers(self) -> list[int]:
        """The worker processes multiprocessing spawned (its resource tracker aside);
        none when the server process is the one worker."""
        children = self.pids()[1:]
        return [p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mirror ARGS`` to completion, capturing its output; whatever it
    started (a ``serve`` that should have refused, and its workers) goes with it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    environ.update(env or {})
    argv = [sys.executable, "-m", "mirror", *args]
    pipe = subprocess.PIPE
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, text=True,
                               env=environ, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
