"""Statistics of evaluation results: visual token counts per image (mean, std, range; pooled over disjoint sets)
and the Wilson interval of an accuracy."""

from __future__ import annotations

import math
from typing import Any, Iterable


def token_stats(counts: Iterable[int]) -> dict[str, float | int]:
    """Count, mean, population std, min and max of visual token counts (one entry per image)."""
    values = [int(c) for c in counts]
    if not values:
        return {"images": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"images": len(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def pooled_stats(parts: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Combine :func:`token_stats` of disjoint sets of images (exact for mean and population std)."""
    parts = [p for p in parts if p and p.get("images")]
    n = sum(int(p["images"]) for p in parts)
    if not n:
        return {"images": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(p["images"] * p["mean"] for p in parts) / n
    second = sum(p["images"] * (p["std"] ** 2 + p["mean"] ** 2) for p in parts) / n
    out: dict[str, Any] = {"images": n, "mean": mean, "std": math.sqrt(max(second - mean**2, 0.0))}
    mins = [p["min"] for p in parts if p.get("min") is not None]
    maxs = [p["max"] for p in parts if p.get("max") is not None]
    out["min"] = min(mins) if len(mins) == len(parts) else None
    out["max"] = max(maxs) if len(maxs) == len(parts) else None
    return out


def format_stats(stats: dict[str, Any]) -> str:
    if not stats.get("images"):
        return "no images"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} visual tokens per image ({stats['images']} images)"


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (default z: 95 %); ``(0, 1)`` for ``n = 0``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
