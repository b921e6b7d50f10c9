"""Free ports on 127.0.0.1 and waiting for HTTP servers to come up."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = ["ServiceNotReady", "free_port", "process_output_tail", "wait_http_ok"]

POLL_INTERVAL = 0.05


class ServiceNotReady(RuntimeError):
    """A server did not answer in time, or its process died while we waited."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def process_output_tail(
    process: subprocess.Popen[Any] | None = None,
    stderr_path: str | Path | None = None,
    lines: int = 40,
) -> str:
    """The last ``lines`` of a process's captured stderr (from a file, or a pipe if it died)."""
    if stderr_path is not None:
        try:
            return _tail(Path(stderr_path).read_text(errors="replace"), lines)
        except OSError as exc:
            return f"(cannot read {stderr_path}: {exc})"
    if process is not None and process.stderr is not None and process.poll() is not None:
        data = process.stderr.read()
        if isinstance(data, bytes):
            data = data.decode(errors="replace")
        return _tail(str(data), lines)
    return "(stderr not captured)"


def wait_http_ok(
    url: str,
    timeout: float = 30,
    process: subprocess.Popen[Any] | None = None,
    *,
    stderr_path: str | Path | None = None,
    name: str | None = None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.Response:
    """Poll ``url`` until it answers with a status below 500; return that response.

    Connection errors and 5xx answers are retried every :data:`POLL_INTERVAL` seconds.  If
    ``process`` is given and exits meanwhile, fail at once with its exit code and the tail of
    its stderr (read from ``stderr_path`` if given, else from ``process.stderr`` if a pipe).
    On timeout raise :class:`ServiceNotReady` with the last error seen.
    """
    label = name or url
    deadline = time.monotonic() + timeout
    last: str = "no attempt made"
    with httpx.Client(
        timeout=min(5.0, max(timeout, 0.1)), trust_env=False, verify=verify
    ) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise ServiceNotReady(
                    f"{label}: process {process.pid} exited with code {process.returncode} "
                    f"before {url} answered; stderr tail:\n"
                    f"{process_output_tail(process, stderr_path)}"
                )
            try:
                response = client.get(url)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 500:
                    return response
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            if time.monotonic() >= deadline:
                detail = ""
                if process is not None:
                    detail = (
                        f"\nprocess {process.pid} still running; stderr tail:\n"
                        f"{process_output_tail(process, stderr_path)}"
                    )
                raise ServiceNotReady(
                    f"{label}: {url} not answering after {timeout:.1f}s (last: {last}){detail}"
                )
            time.sleep(POLL_INTERVAL)


class LoopbackService:
    """Addresses of a registry-speaking service listening on 127.0.0.1:``port``."""

    port: int

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    def ref(self, repo_ref: str) -> str:
        """skopeo reference: ``ref("library/x:1")`` -> ``docker://127.0.0.1:PORT/library/x:1``."""
        return f"docker://{self.host}/{repo_ref}"


class Service:
    """Something a test starts and must stop: ``with`` starts it, and closes it on the
    way out or when starting fails half-way. ``close`` is ``stop`` plus any cleanup."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
