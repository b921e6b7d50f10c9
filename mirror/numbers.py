"""Numbers from the network (request parameters, Range, upstream headers), parsed
with bounds.

``int()`` accepts what no HTTP peer means (``"²"``, ``" 5"``, ``"1_000"``) and raises
on 5,000 digits; a hostile value must become "absent" or a clamped number, never
an exception in a response path.
"""

from __future__ import annotations

__all__ = ["MAX_DIGITS", "bounded_int"]

# More digits than any size or count we could act on (2**63 has 19).
MAX_DIGITS = 19


def bounded_int(text: str | None, *, limit: int) -> int | None:
    """The plain decimal ``text`` as an int no larger than ``limit``; None when it
    is absent or not ASCII digits. Longer numbers are clamped, not parsed."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    if len(text) > MAX_DIGITS:
        return limit
    return min(int(text), limit)
