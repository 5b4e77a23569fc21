"""Measurements behind docs/qwen_vl.md ("Vision tower") on tiny random Qwen towers (``eval_scripts/
qwen_tower_design.py`` is the command). A module of its own: the one study of the Qwen tower's design choices
(the merged token's position rule, batching, thresholds across image sizes).

Per family and kept share: thresholds are found (finding mode, constant schedule) on images of one seed, then
measured on images of another seed, four kinds flat to busy, at mixed sizes: cells kept per kind, and ``rel_dev``
= ‖merged output expanded to its cells − stock output‖ / ‖stock output‖ for each position rule (centroid of the
covered tokens' (h, w), or the first unit's); the largest |difference| between the batch and each image alone; and
the share kept when the thresholds found at 8x8 patches meet larger images (the 64 px samples upsampled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

import dymu
from dymu.encoders.qwen_vl import keep_fraction_merge_counts, patchify
from dymu.samples import make_image

KINDS = ("flat", "gradient", "stripes", "textured")
SIZES = ((8, 8), (12, 8), (16, 12), (8, 16))  # (h, w) in patches
FINDING_KINDS = ("textured", "stripes", "gradient", "textured") * 2
RULES = ("centroid", "first")


def sample_batch(tower: nn.Module, kinds: Sequence[str], sizes: Sequence[tuple[int, int]],
                 seed: int) -> tuple[Tensor, Tensor]:
    """The tower's inputs (flat patches, ``grid_thw``) for one :func:`dymu.samples.make_image` per kind and size."""
    p = tower.config.patch_size
    parts = []
    for i, (kind, (h, w)) in enumerate(zip(kinds, sizes)):
        img = np.asarray(make_image(kind, 64, seed=seed + i).resize((w * p, h * p)), dtype=np.float32) / 255.0
        parts.append(patchify(((torch.from_numpy(img).permute(2, 0, 1) - 0.5) / 0.25)[None], p, 2, 2))
    return torch.cat([f for f, _ in parts]), torch.cat([g for _, g in parts])


@torch.no_grad()
def merged_images(tower: nn.Module, x: Tensor, grid: Tensor, thresholds: Sequence[float],
                  rule: str = "centroid") -> list:
    """The per-image merged outputs (``MergedImage``) of the tower patched with ``thresholds``."""
    state = dymu.patch(tower, thresholds=list(thresholds))
    state.position_rule = rule
    try:
        tower(x, grid_thw=grid)
        return state.images
    finally:
        dymu.unpatch(tower)


@torch.no_grad()
def find_keep_thresholds(tower: nn.Module, x: Tensor, grid: Tensor, keep: float) -> list[float]:
    """Thresholds (finding mode, constant schedule) that keep ``keep`` of the 4x4-cell images ``x``."""
    dymu.patch(tower, merge_counts=keep_fraction_merge_counts(16, keep, len(tower.blocks)))
    try:
        tower(x, grid_thw=grid)
        return list(dymu.get_state(tower).run.found_thresholds)
    finally:
        dymu.unpatch(tower)


@dataclass
class KeepRow:
    """One kept share on one family."""

    keep: float
    cells_kept: list[tuple[int, int]]  # per image of KINDS: (kept, cells)
    rel_dev: dict[str, float]  # per position rule
    batch_vs_alone: float  # max |diff| of merged features, batch vs each image alone (centroid rule)
    shares_at_sizes: dict[int, tuple[float, float]] = field(default_factory=dict)  # side -> (textured, stripes)


def keep_row(tower: nn.Module, x: Tensor, grid: Tensor, stock: Tensor, thresholds: list[float], keep: float,
             sizes_too: bool) -> KeepRow:
    """:class:`KeepRow` of ``thresholds`` on ``x`` (and, with ``sizes_too``, at 8x8, 16x16 and 24x24 patches)."""
    rel_dev, runs = {}, {}
    for rule in RULES:
        images = runs[rule] = merged_images(tower, x, grid, thresholds, rule)
        expanded = torch.cat([m.features[m.source_map] for m in images])
        rel_dev[rule] = float((expanded - stock).norm() / stock.norm())
    alone = [merged_images(tower, xi, grid[i:i + 1], thresholds)[0]
             for i, xi in enumerate(x.split(grid.prod(-1).tolist()))]
    diff = max(float((a.features - b.features).abs().max()) for a, b in zip(alone, runs["centroid"]))
    cells = (grid.prod(-1) // 4).tolist()
    row = KeepRow(keep, [(len(m.features), n) for m, n in zip(runs["centroid"], cells)], rel_dev, diff)
    if sizes_too:
        for side in (8, 16, 24):
            xs, gs = sample_batch(tower, ["textured", "stripes"], [(side, side)] * 2, seed=300)
            shares = [len(m.features) / (side * side // 4) for m in merged_images(tower, xs, gs, thresholds)]
            row.shares_at_sizes[side] = (shares[0], shares[1])
    return row


@torch.no_grad()
def family_rows(tower: nn.Module, keeps: Sequence[float]) -> tuple[float, list[KeepRow]]:
    """Max |diff| merging off vs stock, and a :class:`KeepRow` per share (sizes for the first share only)."""
    x, grid = sample_batch(tower, KINDS, SIZES, seed=100)
    x_find, g_find = sample_batch(tower, FINDING_KINDS, [(8, 8)] * 8, seed=200)
    stock = tower(x, grid_thw=grid).pooler_output
    off = torch.cat([m.features for m in merged_images(tower, x, grid, [1.0] * len(tower.blocks))])
    rows = [keep_row(tower, x, grid, stock, find_keep_thresholds(tower, x_find, g_find, keep), keep, i == 0)
            for i, keep in enumerate(keeps)]
    return float((off - stock).abs().max()), rows
