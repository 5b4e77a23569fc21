"""Visual tokens DyMU keeps per complexity level of a complexity-VQA set (docs/adaptivity.md).

Reads a ``dymu encode --json`` output over images of a set written by ``dymu complexity-vqa`` and that set's
``questions.json``; prints tokens kept (mean ± std, min, max) per level and per background.

  dymu complexity-vqa --seed 1 --count 1040 --out cvqa_seed1
  dymu encode --model dinov2-small-224-tome-28out --thresholds T.safetensors --token-order single --json \
      cvqa_seed1/images/000{000..207}.png > tokens.json
  python eval_scripts/complexity_tokens_per_level.py tokens.json cvqa_seed1/questions.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encode_json", help="output of dymu encode --json")
    parser.add_argument("questions", help="the set's questions.json (dymu complexity-vqa)")
    args = parser.parse_args()
    encoded = json.loads(Path(args.encode_json).read_text())
    by_image = {Path(r["image"]).name: r for r in json.loads(Path(args.questions).read_text())}
    groups: dict[str, list[int]] = defaultdict(list)
    for im in encoded["images"]:
        r = by_image[Path(im["path"]).name]
        for key in ("all", f"level {r['level']}", f"background {r['background']}"):
            groups[key].append(im["tokens"])
    print(f"{'':18} {'images':>6}  tokens kept of {encoded['patch_tokens']}")
    for key in sorted(groups):
        v = groups[key]
        print(f"{key:18} {len(v):6}  {statistics.mean(v):6.1f} ± {statistics.pstdev(v):5.1f}  [{min(v)}, {max(v)}]")


if __name__ == "__main__":
    main()
