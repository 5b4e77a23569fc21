"""What a benchmark prints: performance targets (PASS/MISS, never asserted), aligned tables, sizes, the setting."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import transformers


@dataclass
class Target:
    """A performance goal, printed next to the measured figure (PASS/MISS; never asserted)."""

    name: str
    measured: float
    goal: float
    higher_is_better: bool = True
    unit: str = "x"

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.measured):
            return False
        return self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return (
            f"  [{'PASS' if self.passed else 'MISS'}] {self.name}: measured {self.measured:.3f}{self.unit} "
            f"(target {op} {self.goal:g}{self.unit})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "goal": self.goal, "passed": self.passed}


# -------------------------------------------------------------------------------------------- output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def environment_line(device: torch.device, dtype: torch.dtype) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return (
        f"device: {device} ({where}); dtype {str(dtype).removeprefix('torch.')}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def closing_lines(res: dict[str, Any], heading: str = "targets (not asserted):") -> list[str]:
    """The last lines of a benchmark's report: its targets (PASS/MISS) and the process peak RSS."""
    rss = f"process peak RSS (whole run): {human_bytes(res['maxrss_bytes'])}"
    return [heading, *(t.line() for t in res["_targets"]), rss]


def compare_to_first(
    rows: Sequence[dict[str, Any]], *, speedups: dict[str, str] | None = None, ratios: dict[str, str] | None = None
) -> None:
    """Figures of each row against the first one (the baseline), added to the rows: ``speedups[name] = key`` sets
    ``row[name] = first[key] / row[key]`` (above 1: this row is faster), ``ratios[name] = key`` sets ``row[name] =
    row[key] / first[key]``; NaN where the divisor is 0."""
    first = rows[0]
    for row in rows:
        for name, key in (speedups or {}).items():
            row[name] = first[key] / row[key] if row[key] else float("nan")
        for name, key in (ratios or {}).items():
            row[name] = row[key] / first[key] if first[key] else float("nan")


def printout(heading: Sequence[str], headers: Sequence[str], rows: Sequence[Sequence[Any]], res: dict[str, Any]) -> str:
    """A benchmark's report: its heading lines, the table between blank lines, then :func:`closing_lines` (only the
    peak RSS line for a benchmark without targets)."""
    closing = closing_lines(res) if res["_targets"] else closing_lines(res)[-1:]
    return "\n".join([*heading, "", format_table(headers, rows), "", *closing])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)
