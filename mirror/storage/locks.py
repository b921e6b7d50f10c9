"""Advisory file locks that tell worker processes which digests are being filled.

The kernel drops an ``flock`` when its process dies, so a lock left by a killed
worker never blocks anyone, and a temporary file whose lock is free belongs to
no live fill.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["FileLock", "lock_is_held", "read_note"]


class FileLock:
    """An exclusive, non-blocking ``flock`` on a file; it also carries a short note."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The holder before us may have unlinked the file after we opened it;
            # a lock on an unlinked file excludes nobody, so start again.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self._fd = fd
                    return True
            except FileNotFoundError:
                pass
            os.close(fd)

    def write_note(self, note: str) -> None:
        """Leave a note (e.g. the expected size) for processes that find the lock held."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, note.encode(), 0)

    def release(self, *, remove: bool = False) -> None:
        """Drop the lock; ``remove`` unlinks the file first, while it is still ours."""
        if self._fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock


def read_note(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text()
    return ""


def lock_is_held(path: Path) -> bool:
    """True while some live process holds the lock at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
