"""The upstream link model: a TCP proxy that makes loopback behave like one WAN link.

    python bench/link.py --listen 127.0.0.1:PORT --target 127.0.0.1:PORT \\
        [--rate 100MB/s] [--latency-ms 0]

It accepts connections on ``--listen``, opens one connection to ``--target`` for each (after
``--latency-ms``, once per connection) and forwards bytes both ways.  The bytes going back
(target → client) of all connections together draw on one token bucket of ``--rate`` bytes per
second, as on a single shared link; the client → target direction (requests) is not limited.
``--rate 0`` forwards without a limit.

The bucket is kept as a virtual clock: a chunk read from the target reserves the next
``len / rate`` seconds of the link and is written to the client when its reservation starts
(a sleep).  Reservations are made in arrival order and the clock never lags real time by more
than the bucket's depth (``BURST_SECONDS`` of the rate), so idle time is not saved up beyond
that burst, and the long-run aggregate rate is the configured one however late a sleep wakes
up (lateness delays a chunk, not the reservations after it).

Standard library only: the harness runs it in its own process (``bench.procs.UpstreamLink``),
so its CPU time and its GIL are nobody else's.  It writes ``LINK-READY`` when it listens and a
``LINK-SUMMARY {json}`` line with its counters when it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

BURST_SECONDS = 0.01  #: bucket depth: 10 ms of the rate (1 MB at 100 MB/s) ...
MIN_BURST = 64 * 1024  #: ... and at least this many bytes

_UNITS = {
    "": 1.0,
    "b": 1.0,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "kib": 1024.0,
    "mib": 1024.0**2,
    "gib": 1024.0**3,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
}
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*(?:/s)?\s*")


def parse_rate(text: str) -> float:
    """Bytes per second from ``100MB/s``, ``50MiB/s``, ``1Gbit/s``, ``250000`` or ``0``.

    ``k``/``M``/``G`` (with or without ``B``) are powers of 10, ``KiB``/``MiB``/``GiB`` powers
    of 2, ``kbit``/``Mbit``/``Gbit`` bits; ``/s`` is optional.
    """
    match = _RATE.fullmatch(text.lower())
    if match is None or match[2] not in _UNITS:
        raise ValueError(
            f"not a rate: {text!r} (examples: 100MB/s, 50MiB/s, 800Mbit/s, 0 for no limit)"
        )
    return float(match[1]) * _UNITS[match[2]]


def format_rate(rate: float) -> str:
    """``100 MB/s`` (10^6 bytes), or ``unlimited`` for 0."""
    return f"{rate / 1e6:.4g} MB/s" if rate > 0 else "unlimited"


class Bucket:
    """One link's token bucket (``rate`` bytes/s, ``burst`` bytes deep) as a virtual clock.

    ``empty`` is when the bucket would be empty given what was reserved so far: at time ``t``
    it holds ``min(burst, rate × (t - empty))`` tokens.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.depth = burst / rate if rate > 0 else 0.0  #: burst in seconds of the link
        self.empty = 0.0

    def reserve(self, size: int, now: float) -> float:
        """Take ``size`` bytes (debt allowed); return the seconds to wait before sending."""
        if self.rate <= 0:
            return 0.0
        self.empty = max(self.empty, now - self.depth)  # a full bucket holds no more
        self.empty += size / self.rate
        return max(0.0, self.empty - now)


class Link:
    """The proxy's state: the shared :class:`Bucket`, the target and the counters."""

    def __init__(self, target: tuple[str, int], rate: float, latency: float) -> None:
        self.target = target
        self.bucket = Bucket(rate, max(MIN_BURST, rate * BURST_SECONDS))
        self.latency = latency
        self.started = time.monotonic()
        self.connections = 0
        self.open = 0
        self.peak_open = 0
        self.failed_connects = 0
        self.bytes_down = 0  #: target → clients
        self.bytes_up = 0  #: clients → target
        self.throttled_seconds = 0.0  #: sum of the waits imposed by the bucket

    def accept(self) -> asyncio.Protocol:
        """A protocol for a new client connection (``loop.create_server``'s factory)."""
        return Connection(self).client

    def summary(self) -> dict[str, Any]:
        return {
            "rate_bytes_per_second": self.bucket.rate,
            "latency_ms": self.latency * 1000,
            "seconds": round(time.monotonic() - self.started, 1),
            "connections": self.connections,
            "peak_open_connections": self.peak_open,
            "open_connections": self.open,
            "failed_connects": self.failed_connects,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "throttled_seconds": round(self.throttled_seconds, 2),
        }


class Side(asyncio.Protocol):
    """One socket of a proxied connection; what it receives is written to its ``peer``.

    Flow control is asyncio's: when the peer's write buffer is over its high-water mark, the
    peer pauses this side's reading (:meth:`pause_writing`) until it has drained; a throttled
    side also stops reading while a chunk waits for its turn on the link.
    """

    def __init__(self, connection: Connection, *, throttled: bool) -> None:
        self.connection = connection
        self.link = connection.link
        self.throttled = throttled
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.waiting: asyncio.TimerHandle | None = None  #: a chunk waiting for the bucket
        self.peer_full = False  #: the peer's write buffer is over its high-water mark
        self.eof = False  #: this side received EOF: nothing more to forward
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self is self.connection.client:
            transport.pause_reading()  # until the target is connected
            self.connection.start()

    def data_received(self, data: bytes) -> None:
        peer, transport = self.peer, self.transport
        assert peer is not None and peer.transport is not None and transport is not None
        if not self.throttled:
            self.link.bytes_up += len(data)
            peer.transport.write(data)
            return
        self.link.bytes_down += len(data)
        loop = asyncio.get_running_loop()
        wait = self.link.bucket.reserve(len(data), loop.time())
        if wait <= 0:
            peer.transport.write(data)
            return
        self.link.throttled_seconds += wait
        transport.pause_reading()
        self.waiting = loop.call_later(wait, self._release, data)

    def _release(self, data: bytes) -> None:
        self.waiting = None
        peer, transport = self.peer, self.transport
        assert peer is not None and peer.transport is not None and transport is not None
        if peer.closed:
            return
        peer.transport.write(data)
        if self.closed:  # the target closed while the chunk waited: pass the rest on
            self.connection.close(abort=False)
        elif self.eof:
            self._forward_eof()
        elif not self.peer_full:
            transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.waiting is None:
            self._forward_eof()
        return True  # keep the socket open: the other direction may still be going

    def _forward_eof(self) -> None:
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.closed:
            return
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        self.connection.direction_done()

    def pause_writing(self) -> None:
        # this side's write buffer is full: stop reading what fills it
        if self.peer is not None and self.peer.transport is not None:
            self.peer.peer_full = True
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.peer_full = False
            if peer.waiting is None and not peer.closed and not peer.eof:
                peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiting is not None and exc is None:
            return  # the waiting chunk still goes out first (see _release)
        self.connection.close(abort=exc is not None)


class Connection:
    """A client connection and the one it opens to the target (after the latency)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.client = Side(self, throttled=False)
        self.target = Side(self, throttled=True)
        self.client.peer, self.target.peer = self.target, self.client
        self.done = 0  #: directions that have forwarded their EOF
        self.finished = False
        link.connections += 1
        link.open += 1
        link.peak_open = max(link.peak_open, link.open)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Connect to the target (the client's reading is paused meanwhile)."""
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        if self.link.latency > 0:
            await asyncio.sleep(self.link.latency)
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.target, *self.link.target)
        except OSError:
            self.link.failed_connects += 1
            self.close(abort=True)
            return
        if self.finished:  # the client went away meanwhile
            if self.target.transport is not None:
                self.target.transport.close()
            return
        assert self.client.transport is not None
        self.client.transport.resume_reading()

    def direction_done(self) -> None:
        self.done += 1
        if self.done == 2:
            self.close(abort=False)

    def close(self, *, abort: bool) -> None:
        """Close both sockets (``close`` sends what is buffered first, ``abort`` does not)."""
        if self.finished:
            return
        self.finished = True
        self.link.open -= 1
        for side in (self.client, self.target):
            if side.waiting is not None:
                side.waiting.cancel()
                side.waiting = None
            side.closed = True
            if side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def serve(listen: tuple[str, int], link: Link) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(link.accept, *listen, backlog=256)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(
        f"LINK-READY {listen[0]}:{listen[1]} -> {link.target[0]}:{link.target[1]}, "
        f"{format_rate(link.bucket.rate)}, latency {link.latency * 1000:g} ms",
        flush=True,
    )
    async with server:
        await stop.wait()
    print(f"LINK-SUMMARY {json.dumps(link.summary())}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/link.py", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--target", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--rate", type=_rate, default=100e6, help="e.g. 100MB/s; 0: no limit")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="per connection setup")
    args = parser.parse_args(argv)
    link = Link(args.target, args.rate, args.latency_ms / 1000)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, link))
    return 0


if __name__ == "__main__":
    sys.exit(main())
