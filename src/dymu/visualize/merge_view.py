"""Which patches share a merged token: :func:`merge_view` encodes an image with a patched tower and returns a
:class:`MergeView` (per patch its group at a layer, one distinct colour per group, the tokens kept per layer)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

import dymu
from dymu.visualize.towers import Tower, input_view, pixels


@dataclass
class MergeView:
    """Which patches share a merged token at ``layer``, for one image."""

    image: np.ndarray  # [H, W, 3] uint8, the model's input view
    groups: np.ndarray  # [gh, gw] int: group of each patch, numbered 0.. in raster order of first patch
    colors: np.ndarray  # [gh, gw, 3] uint8: the group's colour (distinct groups, distinct colours)
    tokens_per_layer: list[int]  # tokens at the input and after each block (CLS included if any)
    layer: int  # hidden-state index the groups are taken from (1..L; L = last block's output)
    has_cls: bool
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.groups.shape  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        """Visual tokens kept at ``layer`` (CLS not counted)."""
        return int(self.groups.max()) + 1


# Kelly's colours of maximum contrast (white and black left out): the largest groups get these.
KELLY = np.array([
    [0xF3, 0xC3, 0x00], [0x87, 0x56, 0x92], [0xF3, 0x84, 0x00], [0xA1, 0xCA, 0xF1], [0xBE, 0x00, 0x32],
    [0xC2, 0xB2, 0x80], [0x00, 0x88, 0x56], [0xE6, 0x8F, 0xAC], [0x00, 0x67, 0xA5], [0xF9, 0x93, 0x79],
    [0x60, 0x4E, 0x97], [0xF6, 0xA6, 0x00], [0xB3, 0x44, 0x6C], [0xDC, 0xD3, 0x00], [0x88, 0x2D, 0x17],
    [0x8D, 0xB6, 0x00], [0x65, 0x45, 0x22], [0xE2, 0x58, 0x22], [0x2B, 0x3D, 0x26], [0x84, 0x84, 0x82],
], dtype=np.uint8)


def group_palette(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` uint8 colours, all distinct: Kelly's high-contrast colours first, then a shuffled lattice."""
    levels = max(3, math.ceil((n + len(KELLY)) ** (1 / 3)) + 1)
    values = np.linspace(40, 235, levels).round().astype(np.uint8)
    lattice = np.stack(np.meshgrid(values, values, values, indexing="ij"), -1).reshape(-1, 3)
    spread = lattice.max(1).astype(int) - lattice.min(1).astype(int)
    lattice = lattice[np.argsort(-spread, kind="stable")][: max(n, len(lattice) // 2)]  # prefer saturated colours
    lattice = lattice[np.random.default_rng(seed).permutation(len(lattice))]
    known = {tuple(c) for c in KELLY}
    lattice = np.array([c for c in lattice if tuple(c) not in known], dtype=np.uint8).reshape(-1, 3)
    return np.concatenate([KELLY, lattice])[:n]


def group_colors(groups: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 colour per patch: distinct groups get distinct colours, larger groups the more distinct ones."""
    sizes = np.bincount(groups.ravel())
    by_size = np.argsort(-sizes, kind="stable")  # ties: lower (earlier) group first
    palette = np.empty((len(sizes), 3), dtype=np.uint8)
    palette[by_size] = group_palette(len(sizes))
    return palette[groups]


def groups_from_source_map(source_map: torch.Tensor, grid: tuple[int, int], has_cls: bool) -> np.ndarray:
    """``[gh, gw]`` group id per patch from one image's source map (CLS position dropped), renumbered 0..k-1."""
    patch_map = source_map[1:] if has_cls else source_map
    ids = patch_map.cpu().numpy()
    _, groups = np.unique(ids, return_inverse=True)  # merged tokens keep raster order of their first patch
    return groups.reshape(grid)


@torch.no_grad()
def merge_views(tower: Tower, images: Sequence[Any], layer: int = -1) -> list[MergeView]:
    """Encode ``images`` with the patched tower and describe each image's merge groups at ``layer``."""
    values = pixels(tower, images)
    tower.model(pixel_values=values)
    run = dymu.last_run(tower.model)
    num_states = len(run.sizes)
    index = layer if layer >= 0 else num_states + layer
    if not 0 <= index < num_states:
        raise ValueError(f"layer {layer} is out of range: the tower has {num_states - 1} blocks (use 0..{num_states - 1} or -1)")
    side = tower.image_size // tower.patch_size
    views_rgb = input_view(tower, values)
    tokens = run.tokens_per_layer().T.tolist()
    out = []
    for b in range(values.shape[0]):
        groups = groups_from_source_map(run.source_maps[index][b], (side, side), tower.has_cls)
        colors = group_colors(groups)
        out.append(MergeView(views_rgb[b], groups, colors, tokens[b], index, tower.has_cls, tower.patch_size))
    return out


def merge_view(tower: Tower, image: Any, layer: int = -1) -> MergeView:
    return merge_views(tower, [image], layer)[0]
