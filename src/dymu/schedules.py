"""Merge schedules: how many tokens each encoder layer merges, ``r_total`` spread over ``L`` layers as the authors'
code spreads it (``constant``, ``linear``, ``reverse_linear``)."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "reverse_linear"]
SCHEDULES: tuple[str, ...] = ("constant", "linear", "reverse_linear")


def merge_schedule(kind: str, r_total: int, num_layers: int) -> list[int]:
    """Per-layer merge counts that sum to ``r_total``, as the authors' code computes them.

    * ``constant``: ``r_total // L`` each, the remainder one by one on the first layers;
    * ``linear``: the authors' decreasing ramp — ``r0 = 2*r_total // L`` lowered by ``r0 / L`` per layer
      (truncated), the last non-zero layer taking what is left, 0 after it;
    * ``reverse_linear``: the same ramp reversed (0 first).

    For the few ``(r_total, L)`` where the authors' ramp never reaches ``r_total`` (their loop does not end,
    e.g. 96 over 24 layers), the ramp is proportional to ``L-1-l`` rounded by largest remainder instead.
    """
    kind = kind.replace("-", "_")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if r_total < 0:
        raise ValueError(f"r_total must be >= 0, got {r_total}")
    if kind == "constant" or num_layers == 1 or r_total == 0:
        base, extra = divmod(r_total, num_layers)
        return [base + (1 if layer < extra else 0) for layer in range(num_layers)]
    counts = _authors_ramp(r_total, num_layers) or _proportional_ramp(r_total, num_layers)
    return counts[::-1] if kind == "reverse_linear" else counts


def _authors_ramp(r_total: int, num_layers: int) -> list[int] | None:
    r0 = (2 * r_total) // num_layers
    step = r0 / num_layers
    counts: list[int] = []
    while len(counts) < num_layers and sum(counts) + int(r0 - len(counts) * step) < r_total:
        counts.append(int(r0 - len(counts) * step))
    if sum(counts) < r_total:
        counts.append(r_total - sum(counts))
    if len(counts) > num_layers or (counts and counts[-1] <= 0) or sum(counts) != r_total:
        return None  # where their loop would run forever (or overflow the layers)
    return counts + [0] * (num_layers - len(counts))


def _proportional_ramp(r_total: int, num_layers: int) -> list[int]:
    weights = [num_layers - 1 - layer for layer in range(num_layers)]
    total = sum(weights)
    exact = [r_total * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(num_layers), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: r_total - sum(counts)]:
        counts[i] += 1
    return counts
