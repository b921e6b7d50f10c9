"""Sampling profiles of the mirror under load, with py-spy (a bench tool, not a runtime one).

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;… count``); the summary
is each function's share of the samples, inclusive (anywhere on the stack) and self (on top).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

__all__ = ["py_spy", "summarize"]


@contextlib.contextmanager
def py_spy(pid: int, out: Path, *, rate: int = 500) -> Iterator[None]:
    """Sample ``pid`` (and its children) into ``out`` while the block runs. ``--nonblocking``:
    the process is not paused to be sampled, so the profile costs it little."""
    executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    process = subprocess.Popen(
        [executable, "record", "--nonblocking", "--subprocesses", "-r", str(rate),
         "-f", "raw", "-o", str(out), "--pid", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield
    finally:
        process.send_signal(2)  # SIGINT: py-spy writes what it has sampled and exits
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr:
            process.stderr.close()


def _function(frame: str) -> str:
    # "name (site-packages/pkg/module.py:123)" -> "name (pkg/module.py)"
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({'/'.join(path.split('/')[-2:])})" if path else name


def summarize(path: Path, top: int = 12) -> tuple[int, list[tuple[str, float, float]]]:
    """The number of samples, and ``(function, inclusive share, self share)`` of the
    functions most often on top of the stack and of the mirror's, diskcache's, anyio's
    and starlette's functions most often on it, over the samples of running threads
    (py-spy leaves idle ones out)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function(f) for f in stack.split(";") if f and not f.startswith("process ")]
        for name in set(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    if total == 0:
        return 0, []
    ours = ("(mirror/", "(diskcache/", "(anyio/", "(starlette/", "(_asyncio.py")
    busiest = [name for name, _ in own.most_common(top)]
    inner = [name for name, _ in inclusive.most_common() if any(o in name for o in ours)]
    names = busiest + [name for name in inner if name not in busiest][:top]
    return total, [(name, inclusive[name] / total, own[name] / total) for name in names]
