"""A real Redis (Debian's ``redis-server``) for tests: an instance of our own on
127.0.0.1:<free port>, nothing persisted, never the packaged service.

``RedisServer()`` is a context manager; ``stop()`` and ``start()`` again bring the same
address down and back up (an outage mid-test), with an empty data set after the restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import POLL_INTERVAL, Service, ServiceNotReady, free_port, process_output_tail

__all__ = ["RedisServer"]

BINARY = "redis-server"


def _pong(port: int) -> bool:
    """Does a Redis answer PING on the port? (RESP by hand: no client library needed.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(Service):
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = Path(tempfile.mkdtemp(prefix="mirror-redis-"))
        self._stderr = self._workdir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> RedisServer:
        if self._process is not None:
            return self
        binary = shutil.which(BINARY)
        if binary is None:
            raise ServiceNotReady(f"{BINARY} is not installed (scripts/install test adds it)")
        with self._stderr.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._workdir),
                    "--logfile",
                    "",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not _pong(self.port):
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise ServiceNotReady(
                    f"{BINARY} on port {self.port} exited with code {code}:\n"
                    f"{process_output_tail(stderr_path=self._stderr)}"
                )
            if time.monotonic() >= deadline:
                self.stop()
                raise ServiceNotReady(f"{BINARY} on port {self.port} not answering PING")
            time.sleep(POLL_INTERVAL)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)
