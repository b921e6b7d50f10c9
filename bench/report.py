"""Figures, their targets, the printed table and the JSON record."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Against", "Condition", "Figure", "Subject", "render_table", "write_json"]

Against = Literal["abs", "reference", "direct"]
Subject = Literal["mirror", "direct"]
_OPS = {"<=": "≤", ">=": "≥", "==": "="}


@dataclass(frozen=True)
class Condition:
    """``mirror OP factor`` (``against="abs"``) or ``mirror OP factor × reference|direct``
    (``direct`` instead of ``mirror`` for a figure whose subject is ``direct``)."""

    op: Literal["<=", ">=", "=="]
    factor: float
    against: Against = "abs"
    decimals: int = 2  #: ``==`` compares after rounding to this many decimals ...
    tolerance: float = 0.0  #: ... or, when set, within this share of the bound either way

    @property
    def text(self) -> str:
        symbol = _OPS[self.op]
        if self.against == "abs":
            if self.op == "==" and self.tolerance:
                return f"= {self.factor:.4g} ±{self.tolerance:.0%}"
            if self.op == "==":
                return f"= {self.factor:.{self.decimals}f}"
            return f"{symbol} {self.factor:g}"
        short = "ref" if self.against == "reference" else "direct"
        return f"{symbol} {self.factor:g}×{short}"

    def check(self, figure: Figure) -> bool | None:
        value = figure.direct if figure.subject == "direct" else figure.mirror
        if value is None:
            return None
        bound = self.factor
        if self.against != "abs":
            other = figure.reference if self.against == "reference" else figure.direct
            if other is None:
                return None
            bound = self.factor * other
        if self.op == "<=":
            return value <= bound
        if self.op == ">=":
            return value >= bound
        if self.tolerance:
            return abs(value - bound) <= self.tolerance * abs(bound)
        return round(value, self.decimals) == round(bound, self.decimals)


@dataclass
class Figure:
    step: str  #: "link", "1".."6"
    key: str  #: stable identifier in the JSON
    label: str
    unit: str
    decimals: int = 2
    mirror: float | None = None
    reference: float | None = None
    direct: float | None = None
    targets: tuple[Condition, ...] = ()
    applies_direct: bool = False
    #: what the targets are about: the mirror, or (a figure of the setup) direct only
    subject: Subject = "mirror"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.mirror is None or self.reference is None:
            return None
        if self.reference == 0:
            return None if self.mirror == 0 else math.inf
        return self.mirror / self.reference

    @property
    def passed(self) -> bool | None:
        if not self.targets:
            return None
        results = [c.check(self) for c in self.targets]
        if any(r is False for r in results):
            return False
        if any(r is None for r in results):
            return None
        return True

    @property
    def measured(self) -> bool:
        return self.mirror is not None or self.reference is not None or self.direct is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "mirror": self.mirror,
            "reference": self.reference,
            "direct": self.direct,
            "mirror_over_reference": self.ratio,
            "target": ", ".join(c.text for c in self.targets) or None,
            "passed": self.passed,
            "subject": self.subject,
            "notes": self.notes,
        }


def _fmt(value: float | None, decimals: int, applies: bool = True) -> str:
    if not applies:
        return "—"
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:,.{decimals}f}"


def render_table(figures: Sequence[Figure]) -> str:
    header = ["step", "figure", "unit", "mirror", "reference", "direct", "mirror÷ref", "target"]
    header.append("result")
    rows: list[list[str]] = [header]
    for f in figures:
        if not f.measured:
            continue
        verdict = {True: "PASS", False: "FAIL", None: "n/a" if f.targets else ""}[f.passed]
        caches = f.subject == "mirror"
        rows.append(
            [
                f.step,
                f.label,
                f.unit,
                _fmt(f.mirror, f.decimals, caches),
                _fmt(f.reference, f.decimals, caches),
                _fmt(f.direct, f.decimals, f.applies_direct),
                _fmt(f.ratio, 2, caches),
                ", ".join(c.text for c in f.targets),
                verdict,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {3, 4, 5, 6}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in numeric and n else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    tmp.replace(path)
