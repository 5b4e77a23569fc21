"""Which A tokens merge at a layer, given each one's best score (:func:`dymu.merge.bipartite_scores`).

One function per mode of :func:`dymu.merge.dtome_step`: finding merges the batch's best ``B * r`` and records a
threshold (:func:`select_top`), fixed-count ToMe each image's best ``r`` (:func:`select_top_per_row`), inference
every score above the threshold (:func:`select_above`).
"""

from __future__ import annotations

import math
import struct

import torch
from torch import Tensor


def select_top(scores: Tensor, r: int) -> tuple[Tensor, float]:
    """Finding mode: merge the ``B * r`` best edges of the whole batch.

    Ties are broken by position (earlier image, then earlier token), so the choice
    is deterministic. Returns the merge flags ``[B, Na]`` and the threshold: the
    highest score that was not merged, clamped to >= 0. A layer with ``r == 0``
    merges nothing and gets threshold 1.0, as the authors' code leaves it (no
    cosine score is above 1, see :func:`select_above`).
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if r == 0:
        return torch.zeros_like(scores, dtype=torch.bool), 1.0
    k = scores.shape[0] * r
    flat = scores.flatten()
    candidates = int(torch.isfinite(flat).sum())
    if k > candidates:
        raise ValueError(
            f"cannot merge {r} tokens per image ({k} in the batch): only {candidates} tokens can still merge; "
            "lower r_total or use fewer layers"
        )
    order = torch.sort(flat, descending=True, stable=True).indices
    merge = torch.zeros_like(flat, dtype=torch.bool)
    merge[order[:k]] = True
    next_best = float(flat[order[k]]) if k < candidates else 0.0
    return merge.view_as(scores), max(next_best, 0.0)


def select_top_per_row(scores: Tensor, r: int) -> tuple[Tensor, float]:
    """Fixed mode (ToMe): merge each image's ``r`` best edges (ties by position). Returns the merge flags
    ``[B, Na]`` and, for :func:`dtome_step`'s signature, 1.0 (no threshold is found)."""
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    candidates = int(torch.isfinite(scores).sum(1).min()) if scores.numel() else 0
    if r > candidates:
        raise ValueError(f"cannot merge {r} tokens in every image: one image has only {candidates} tokens that can "
                         "still merge; lower r")
    merge = descending_rank(scores) < r
    return merge, 1.0


def select_above(scores: Tensor, threshold: float | Tensor, max_per_row: Tensor | int | None = None) -> Tensor:
    """Inference mode: merge every A token whose score is strictly above the threshold.

    A threshold >= 1 merges nothing (cosine scores are <= 1; rounding must not make
    identical tokens merge at a layer the authors skip). ``max_per_row`` (an int or
    ``[B]``) keeps only the best that many per image (the authors' single-image cap).
    """
    if isinstance(threshold, (int, float)):  # a number (the usual case): decided in Python, one comparison op
        if math.isnan(threshold):
            raise ValueError("threshold is NaN; expected a finite number or +inf (merge nothing)")
        threshold = as_float32(threshold)  # the scores' precision, as a tensor threshold would compare
        merge = scores > threshold if threshold < 1.0 else torch.zeros_like(scores, dtype=torch.bool)
    else:
        threshold = torch.as_tensor(threshold, dtype=scores.dtype, device=scores.device)
        if bool(torch.isnan(threshold).any()):
            raise ValueError("threshold is NaN; expected a finite number or +inf (merge nothing)")
        merge = (scores > threshold) & (threshold < 1.0)
    if max_per_row is not None:
        cap = torch.as_tensor(max_per_row, device=scores.device).reshape(-1, 1)
        if bool((merge.sum(1, keepdim=True) > cap).any()):
            merge &= descending_rank(scores) < cap
    return merge


def as_float32(value: float) -> float:
    """``value`` rounded to float32 (beyond its range: ±inf), without a tensor op."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def descending_rank(scores: Tensor) -> Tensor:
    """[B, Na] long: each entry's place in its row sorted by descending score (ties: lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)
