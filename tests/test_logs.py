"""The log as `mirror serve` writes it: access lines held for a turn of the event loop, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator

import pytest

from mirror.logs import ACCESS_LOG, _JsonFormatter, _TextFormatter, configure_logging


class _Writes:
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return [line.rsplit(": ", 1)[1] for line in "".join(self.writes).splitlines()]


@contextlib.contextmanager
def _configured() -> Iterator[_Writes]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = _Writes()
    try:
        configure_logging("info", "text")
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_access_lines_of_one_turn_of_the_loop_go_out_in_one_write_after_it() -> None:
    async def turns(stream: _Writes) -> None:
        access = logging.getLogger(ACCESS_LOG)
        access.info("one")
        access.info("two")
        assert stream.writes == []  # held while this turn runs
        await asyncio.sleep(0)
        assert len(stream.writes) == 1 and stream.lines() == ["one", "two"]
        access.info("three")
        # Any other line at once, after what is held: uvicorn's "Application shutdown
        # complete." is logged in the turn that ends the process. (A logger of this test's
        # own: others' levels are set by whatever ran before.)
        logging.getLogger("tests.logs.other").info("four")
        assert stream.lines() == ["one", "two", "three", "four"]
        access.info("five")  # held again: the other line wrote what there was

    with _configured() as stream:
        asyncio.run(turns(stream))
        assert stream.lines()[-1] == "five"  # the loop's last turns ran its write


def test_a_line_logged_off_the_loop_is_written_at_once() -> None:
    with _configured() as stream:
        logging.getLogger("tests.logs.thread").info("from a thread")
        assert stream.lines() == ["from a thread"]


@pytest.mark.parametrize(
    "created", [1_764_496_800.0, 1_764_496_800.999, 1_764_496_801.0005, 1_764_496_859.5]
)
def test_the_time_formatted_once_a_second_reads_as_the_standard_formatter_writes_it(
    created: float,
) -> None:
    ours = _TextFormatter("%(asctime)s %(message)s")
    ours.format(logging.makeLogRecord({"msg": "warm", "created": created - 1, "msecs": 0}))
    record = logging.LogRecord("t", logging.INFO, "", 0, "x", (), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    assert ours.formatTime(record) == logging.Formatter().formatTime(record)
    as_json = _JsonFormatter()
    as_json.format(logging.makeLogRecord({"msg": "warm", "created": created - 1, "msecs": 0}))
    utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    assert json.loads(as_json.format(record))["time"] == f"{utc}.{int(record.msecs):03d}Z"
