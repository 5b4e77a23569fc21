"""Measurements behind docs/qwen_vl.md ("Vision tower") on tiny random Qwen towers (weights std 0.3).

For each family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; 4 blocks, width 32): thresholds are found (finding mode,
constant schedule) at each ``--keep`` share on images of one seed, then measured on images of another seed, four
kinds flat to busy, at mixed sizes. Per family and share: cells kept per kind, and ``rel_dev`` = ‖merged output
expanded to its cells − stock output‖ / ‖stock output‖ for each position rule (centroid of the covered tokens'
(h, w), or the first unit's). Also: the largest |difference| to the stock tower with merging off, and between the
batch and each image alone (merging on); and the share kept when the thresholds found at 8x8 patches meet
larger images (the 64 px samples upsampled: smoother as they grow).

The study is :mod:`dymu.studies.qwen_tower_design`; this script prints its lines.

Example:
  python eval_scripts/qwen_tower_design.py --keep 0.5 0.4
"""

from __future__ import annotations

import argparse

from dymu.studies.qwen_tower_design import KINDS, family_rows
from dymu.testing import tiny_qwen_vision_tower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.4])
    args = parser.parse_args()
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        off, rows = family_rows(tiny_qwen_vision_tower(family), args.keep)
        print(f"{family}: merging off vs stock, max |diff| = {off:.2e}")
        for row in rows:
            kept = ", ".join(f"{k} {n}/{c}" for k, (n, c) in zip(KINDS, row.cells_kept))
            print(f"  keep {row.keep:.0%}: cells kept {kept}; rel_dev centroid {row.rel_dev['centroid']:.4f}, first "
                  f"{row.rel_dev['first']:.4f}; batch vs alone max |diff| {row.batch_vs_alone:.1e}")
            if row.shares_at_sizes:  # thresholds found at 8x8 patches, used at larger sizes
                shares = "; ".join(f"{s}x{s}: textured {t:.0%}, stripes {p:.0%}"
                                   for s, (t, p) in row.shares_at_sizes.items())
                print(f"  keep {row.keep:.0%} found at 8x8, share kept at other sizes: {shares}")


if __name__ == "__main__":
    main()
