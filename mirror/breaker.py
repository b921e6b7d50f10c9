"""A circuit breaker: after repeated failures an upstream is left alone for a while.

While open, requests fail at once instead of each paying connect timeouts and
retries against an upstream that is down; stale answers are served instead.
After the cool-down one request is let through as a probe: its success closes
the breaker, its failure opens it for another cool-down.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    def __init__(
        self, failures: int, cooldown: float, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._now = now
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._open_until is None:
            return "closed"
        return "open" if self._now() < self._open_until else "half-open"

    def open_for(self) -> float:
        """Seconds until a probe may go; 0 when closed or half-open."""
        if self._open_until is None:
            return 0.0
        return max(0.0, self._open_until - self._now())

    def allow(self) -> bool:
        """May a request go upstream now? In half-open state, only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        self._failures = 0
        self._open_until = None
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._open_until = self._now() + self._cooldown
            self._probing = False
