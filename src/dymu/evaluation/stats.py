"""Statistics of evaluation results: visual token counts per image (mean, std, range; pooled over disjoint sets),
the Wilson interval of an accuracy, accuracy and tokens per group of questions, and McNemar's paired test."""

from __future__ import annotations

import math
from typing import Any, Hashable, Iterable, Sequence


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


def grouped_accuracy(correct: Sequence[bool], tokens: Sequence[int], groups: Sequence[Hashable]) -> dict[str, dict]:
    """Per group (e.g. complexity level; keys as ``str``, in sorted order): questions, correct answers, accuracy
    with its Wilson interval, and the visual tokens of its images (:func:`token_stats`, population std)."""
    out: dict[str, dict] = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        k = sum(bool(correct[i]) for i in idx)
        t = token_stats(tokens[i] for i in idx)
        out[str(g)] = {"n": len(idx), "correct": k, "accuracy": k / len(idx), "wilson95": list(wilson(k, len(idx))),
                       "tokens_mean": t["mean"], "tokens_std": t["std"]}
    return out


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test of two methods answering the same questions (``first[i]``, ``second[i]``: right or
    wrong on question i): ``b`` = first right and second wrong, ``c`` = the reverse, ``p`` = the two-sided exact
    binomial p-value of b given b + c under Binomial(b + c, 1/2) (1.0 when there are no discordant pairs)."""
    if len(first) != len(second):
        raise ValueError(f"mcnemar: {len(first)} and {len(second)} answers; pair the same questions")
    b = sum(bool(x) and not y for x, y in zip(first, second))
    c = sum(bool(y) and not x for x, y in zip(first, second))
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n  # P(X <= min(b, c)), exact integers
    return {"b": b, "c": c, "n": n, "p": min(1.0, 2 * tail)}
