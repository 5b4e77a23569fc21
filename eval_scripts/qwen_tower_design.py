"""Measurements behind docs/qwen_vl.md ("Vision tower") on tiny random Qwen towers (weights std 0.3).

For each family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; 4 blocks, width 32): thresholds are found (finding mode,
constant schedule) at each ``--keep`` share on images of one seed, then measured on images of another seed, four
kinds flat to busy, at mixed sizes. Per family and share: cells kept per kind, and ``rel_dev`` = ‖merged output
expanded to its cells − stock output‖ / ‖stock output‖ for each position rule (centroid of the covered tokens'
(h, w), or the first unit's). Also: the largest |difference| to the stock tower with merging off, and between the
batch and each image alone (merging on); and the share kept when the thresholds found at 8x8 patches meet
larger images (the 64 px samples upsampled: smoother as they grow).

Example:
  python eval_scripts/qwen_tower_design.py --keep 0.5 0.4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import dymu
from dymu.encoders.qwen_vl import keep_fraction_merge_counts, patchify
from dymu.samples import make_image
from dymu.testing import tiny_qwen_vision_tower

KINDS = ("flat", "gradient", "stripes", "textured")
SIZES = ((8, 8), (12, 8), (16, 12), (8, 16))  # (h, w) in patches


def batch(tower, kinds, sizes, seed):
    p = tower.config.patch_size
    parts = []
    for i, (kind, (h, w)) in enumerate(zip(kinds, sizes)):
        img = np.asarray(make_image(kind, 64, seed=seed + i).resize((w * p, h * p)), dtype=np.float32) / 255.0
        parts.append(patchify(((torch.from_numpy(img).permute(2, 0, 1) - 0.5) / 0.25)[None], p, 2, 2))
    return torch.cat([f for f, _ in parts]), torch.cat([g for _, g in parts])


def merged(tower, x, grid, thresholds, rule="centroid"):
    state = dymu.patch(tower, thresholds=thresholds)
    state.position_rule = rule
    try:
        with torch.no_grad():
            tower(x, grid_thw=grid)
        return state.images
    finally:
        dymu.unpatch(tower)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.4])
    args = parser.parse_args()
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        tower = tiny_qwen_vision_tower(family)
        depth = len(tower.blocks)
        x, grid = batch(tower, KINDS, SIZES, seed=100)
        x_find, g_find = batch(tower, ["textured", "stripes", "gradient", "textured"] * 2, [(8, 8)] * 8, seed=200)
        with torch.no_grad():
            stock = tower(x, grid_thw=grid).pooler_output
        off = torch.cat([m.features for m in merged(tower, x, grid, [1.0] * depth)])
        print(f"{family}: merging off vs stock, max |diff| = {float((off - stock).abs().max()):.2e}")
        cells = (grid.prod(-1) // 4).tolist()
        for keep in args.keep:
            dymu.patch(tower, merge_counts=keep_fraction_merge_counts(16, keep, depth))
            with torch.no_grad():
                tower(x_find, grid_thw=g_find)
            thresholds = list(dymu.get_state(tower).run.found_thresholds)
            dymu.unpatch(tower)
            row, runs = {}, {}
            for rule in ("centroid", "first"):
                images = runs[rule] = merged(tower, x, grid, thresholds, rule)
                expanded = torch.cat([m.features[m.source_map] for m in images])
                row[rule] = float((expanded - stock).norm() / stock.norm())
            alone = [merged(tower, xi, grid[i:i + 1], thresholds)[0] for i, xi in
                     enumerate(x.split(grid.prod(-1).tolist()))]
            diff = max(float((a.features - b.features).abs().max()) for a, b in zip(alone, runs["centroid"]))
            kept = ", ".join(f"{k} {len(m.features)}/{n}" for k, m, n in zip(KINDS, runs["centroid"], cells))
            print(f"  keep {keep:.0%}: cells kept {kept}; rel_dev centroid {row['centroid']:.4f}, first "
                  f"{row['first']:.4f}; batch vs alone max |diff| {diff:.1e}")
            if keep == args.keep[0]:  # thresholds found at 8x8 patches, used at larger sizes
                shares = []
                for side in (8, 16, 24):
                    xs, gs = batch(tower, ["textured", "stripes"], [(side, side)] * 2, seed=300)
                    ks = [len(m.features) / (side * side // 4) for m in merged(tower, xs, gs, thresholds)]
                    shares.append(f"{side}x{side}: textured {ks[0]:.0%}, stripes {ks[1]:.0%}")
                print(f"  keep {keep:.0%} found at 8x8, share kept at other sizes: {'; '.join(shares)}")


if __name__ == "__main__":
    main()
