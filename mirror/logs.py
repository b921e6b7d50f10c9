"""Logging: plain text by default, one JSON object per line when configured.

The access log is one line per request; its fields travel as ``extra`` so the
JSON formatter can keep them as fields rather than a sentence to parse. At the
default level the line was more than a quarter of a warm request's CPU (433 µs a
request against 313 at "warning"): access lines are written once per turn of the
event loop, records skip what no format here prints, and the time is formatted once
a second (text and JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ACCESS_LOG", "configure_logging"]

ACCESS_LOG = "mirror.access"  # the logger of the line per request

_TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# Line breaks and every other control character a request can smuggle into a
# logged value (a path with %0A, a header): written out, a line is one line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


class _Seconds:
    """A record's second as ``strftime`` writes it, made once a second rather than once a
    line (a formatter runs under its handler's lock)."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self._fmt, self._convert = fmt, convert
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self._fmt, self._convert(second))
        return self._text


class _TextFormatter(logging.Formatter):
    """The text format, control characters escaped. A traceback keeps its lines,
    each indented, so no text of an exception's message starts a line of its own."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._seconds = _Seconds(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _CONTROL.sub(_escape, super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + _CONTROL.sub(_escape, line) for line in text.split("\n"))


class _JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class _DropTlsProbes(logging.Filter):
    """skopeo, podman and buildah try TLS first on a plain-HTTP port; that is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Invalid HTTP request received" not in record.getMessage()


class _TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, the access log's lines written once per turn of the event loop rather than
    once per line. Any other line goes out at once, after those held: the process may end
    in the turn that logs it (uvicorn re-raises SIGTERM once shut down), and every
    shutdown logs such a line first."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[str] = []
        self._due: asyncio.AbstractEventLoop | None = None  # the loop a write is due on

    def emit(self, record: logging.LogRecord) -> None:  # under self.lock
        try:
            self._held.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or record.name != ACCESS_LOG:
            self.flush()
        elif self._due is not loop:
            self._due = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            held, self._held, self._due = self._held, [], None
            try:
                if held:
                    self.stream.write("".join(held))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone: nowhere left to say so


def configure_logging(level: str, log_format: str) -> None:
    # No format here prints a record's thread, process name or source line: finding
    # them for every line is work the logging HOWTO's "Optimization" says to turn off.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = _TurnHandler()
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # ACCESS_LOG has every request, with its cache result; uvicorn's would repeat it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(_DropTlsProbes())
    # httpx logs every request at INFO; the access log and metrics already say it all.
    logging.getLogger("httpx").setLevel(logging.WARNING)
