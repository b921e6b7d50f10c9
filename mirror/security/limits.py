"""Token buckets: request budgets per client and the throttle on failed logins.

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second; a request
takes one, or learns how long until one is there (its ``Retry-After``). Buckets live
in the worker's memory: with ``--workers N`` each worker keeps its own, so a client
may get up to N times the configured budget. (A token bucket is a few lines; the
libraries for it bring storage back ends this mirror does not need.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = [
    "Budget",
    "Buckets",
    "Client",
    "ClientLimits",
    "TokenBucket",
    "current_client",
]

_MAX_BUCKETS = 10_000  # beyond this, buckets back to full are forgotten


@dataclass
class TokenBucket:
    burst: float
    rate: float  # tokens per second
    tokens: float
    updated: float

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Take a token; or, if none is there, the seconds until one is (nothing taken)."""
        wait = self.wait(now)
        if wait == 0:
            self.tokens -= 1
        return wait

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class Buckets:
    """One token bucket per key (a client address, a user), created full."""

    def __init__(
        self, rate: float, burst: float, *, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._now = now
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                now = self._now()
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = TokenBucket(self.burst, self.rate, self.burst, self._now())
            self._buckets[key] = bucket
        return bucket

    def take(self, key: str) -> float:
        return self._bucket(key).take(self._now())

    def wait(self, key: str) -> float:
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.wait(self._now())


@dataclass(frozen=True)
class Client:
    """Whom a request is for: its address, and its user when it has logged in."""

    address: str
    user: str | None = None


# The client of the request being answered; read where the service goes upstream
# (the service knows no clients, only a hook).
current_client: ContextVar[Client | None] = ContextVar("mirror_client", default=None)


@dataclass(frozen=True)
class Budget:
    rate: float  # tokens per second
    burst: float


class ClientLimits:
    """Per-client budgets: one for every request, one for requests that go upstream
    (cache misses), each kept per address and per user as configured."""

    def __init__(
        self,
        requests: Budget | None,
        upstream: Budget | None,
        *,
        per_address: bool = True,
        per_user: bool = True,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._requests = Buckets(requests.rate, requests.burst, now=now) if requests else None
        self._upstream = Buckets(upstream.rate, upstream.burst, now=now) if upstream else None
        self.per_address = per_address
        self.per_user = per_user

    @property
    def enabled(self) -> bool:
        return self._requests is not None or self._upstream is not None

    def _keys(self, client: Client) -> list[str]:
        keys = [f"address {client.address}"] if self.per_address else []
        if self.per_user and client.user is not None:
            keys.append(f"user {client.user}")
        return keys

    @staticmethod
    def _take(buckets: Buckets | None, keys: list[str]) -> float:
        """Take a token from each key's bucket, or none if any is empty (its wait)."""
        if buckets is None:
            return 0.0
        wait = max((buckets.wait(key) for key in keys), default=0.0)
        if wait == 0:
            for key in keys:
                buckets.take(key)
        return wait

    def request(self, client: Client) -> float:
        return self._take(self._requests, self._keys(client))

    def upstream(self, client: Client) -> float:
        return self._take(self._upstream, self._keys(client))
