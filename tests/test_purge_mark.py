"""The purge mark: a purge in one process empties the in-memory records of every other
process sharing the cache at their next lookup, with no system call per lookup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mirror.storage.memo import Memo, PurgeMark


def _purge_in_another_process(path: Path) -> None:
    code = "import sys; from mirror.storage.memo import PurgeMark; PurgeMark(sys.argv[1]).change()"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


def test_a_purge_in_another_process_is_seen_at_the_next_lookup(tmp_path: Path) -> None:
    memo = Memo(10, PurgeMark(tmp_path / "purged"))
    memo.put("tag", "record")
    assert memo.get("tag") == "record"
    _purge_in_another_process(tmp_path / "purged")
    assert memo.get("tag") is None
    memo.put("tag", "record read again")
    assert memo.get("tag") == "record read again"  # once: the change is taken in
    _purge_in_another_process(tmp_path / "purged")  # and each purge after it too
    assert memo.get("tag") is None


def test_every_memo_of_a_process_sees_its_own_purge(tmp_path: Path) -> None:
    mark = tmp_path / "purged"
    paths, records = Memo(10, PurgeMark(mark)), Memo(10, PurgeMark(mark))
    paths.put("blob", "path")
    records.put("tag", "record")
    PurgeMark(mark).change()
    assert paths.get("blob") is None
    assert records.get("tag") is None


def test_the_empty_mark_an_older_version_touched_still_carries_purges(tmp_path: Path) -> None:
    mark = tmp_path / "purged"
    mark.touch()
    memo = Memo(10, PurgeMark(mark))
    memo.put("tag", "record")
    assert mark.stat().st_size == 8
    assert memo.get("tag") == "record"  # growing the file is not a purge
    _purge_in_another_process(mark)
    assert memo.get("tag") is None
