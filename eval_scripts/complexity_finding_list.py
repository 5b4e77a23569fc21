"""The threshold-finding image list of the mix model (docs/adaptivity.md): training images only — easy-VQA train
images 2000-2255 (not in the mix run's first 1,500) and the first 256 generated training images (seed 1000, the
same images as the first 256 of `dymu train-projector --mix`), interleaved; 512 records in dymu thresholds' format.

  python eval_scripts/complexity_finding_list.py OUT
  dymu thresholds --model dinov2-small-224-tome-28out --data OUT/finding.json --image-dir OUT --batch-size 64 \
      --output checkpoints/small_vlm_mix/thresholds/dinov2-small-224-tome-28out.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dymu.complexity_vqa import generate, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for the images (links) and finding.json")
    parser.add_argument("--count", type=int, default=256, help="images of each source")
    args = parser.parse_args()
    import easy_vqa  # optional (pip install easy-vqa)

    out = Path(args.out)
    write(generate(1000, args.count, questions_per_image=8), out / "cvqa")
    paths = easy_vqa.get_train_image_paths()
    ids = sorted(paths)[2000 : 2000 + args.count]
    (out / "easy").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, i in enumerate(ids):
        link = out / "easy" / f"{i}.png"
        if not link.exists():
            os.symlink(paths[i], link)
        rows += [{"image": f"easy/{i}.png"}, {"image": f"cvqa/images/{k:06d}.png"}]
    (out / "finding.json").write_text(json.dumps(rows))
    print(f"{len(rows)} images listed in {out / 'finding.json'}")


if __name__ == "__main__":
    main()
