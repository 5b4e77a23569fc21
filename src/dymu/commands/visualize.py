"""Draw which patches DToMe merged together, or image complexity vs tokens kept over a folder.

IMAGE mode writes a PNG with the image as the model sees it, the same image with each patch tinted
by its merge group's colour (one colour per merged token, group boundaries in white), and the tokens
kept after every layer. --scatter FOLDER writes a scatter plot of image complexity (JPEG bytes per
pixel at quality 75) against the visual tokens kept, with the Spearman rank correlation in the title.

Without --model the demo's small random CLIP is used, with thresholds found on built-in images
(no downloads). --model takes a local transformers CLIP or SigLIP folder; give it real thresholds
with --thresholds (a checkpoint, a DyMU name, or comma-separated floats), else they are found on the
built-in synthetic images. A DyMU name's thresholds are looked up in $DYMU_CHECKPOINT_DIR if set, else
in ./checkpoints/threshold_checkpoints, then among the checkpoints shipped with dymu.

Examples:
  dymu visualize photo.jpg                         # -> merged.png
  dymu visualize photo.jpg --out groups.png --layer 3
  dymu visualize photo.jpg --model ./clip-vit-large-patch14-336 \\
      --thresholds checkpoints/threshold_checkpoints/ViT-L-14-336-tome-72out.safetensors
  dymu visualize --scatter ./images --out complexity.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dymu
from dymu import visualize as viz
from dymu.commands._args import add_schedule_argument, check_writable_file, int_at_least

NAME = "visualize"
HELP = "picture of DToMe's merge groups for an image, or complexity vs tokens over a folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", help="image file to draw the merge groups of")
    parser.add_argument("--scatter", metavar="FOLDER", help="plot complexity vs tokens kept over the images in FOLDER")
    parser.add_argument("--model", help="local transformers CLIP/SigLIP folder (default: the demo's random CLIP)")
    parser.add_argument("--thresholds", help="threshold checkpoint, DyMU name, or comma-separated per-layer floats")
    parser.add_argument(
        "--r-total", type=int_at_least(0),
        help="merges over all layers when thresholds are found on built-in images "
        "(default: 150 for the demo model, 7/8 of the patches for --model)",
    )
    add_schedule_argument(parser, default="constant", help="merge schedule when finding thresholds")
    parser.add_argument("--layer", type=int, default=-1, help="hidden-state index to show (-1: the last block)")
    parser.add_argument("--out", help="output PNG (default: merged.png, or complexity.png with --scatter)")


def run(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.scatter is None):
        raise ValueError("give either an IMAGE or --scatter FOLDER (see dymu visualize --help)")
    try:
        viz.require_matplotlib()
    except ImportError as err:
        raise ValueError(str(err)) from None
    # check the inputs (and that the picture can be written) before building a model
    out = Path(args.out or ("complexity.png" if args.scatter else "merged.png"))
    check_writable_file(out, "the picture")
    files = viz.list_images(args.scatter) if args.scatter else None
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"image not found: {args.image}")
    thresholds = viz.parse_checkpoint_or_floats(args.thresholds)
    if args.model:
        tower = viz.load_tower(args.model, thresholds, r_total=args.r_total, schedule=args.schedule)
    else:
        tower = viz.demo_tower(**({"r_total": args.r_total} if args.r_total is not None else {}), schedule=args.schedule)
        if thresholds is not None:
            dymu.configure(tower.model, thresholds=thresholds)
            tower.thresholds = dymu.get_state(tower.model).thresholds.tolist()
            tower.description = "random CLIP ViT (demo); thresholds given"
    print(f"model: {tower.description}")
    if args.scatter:
        result = viz.complexity_vs_tokens(tower, files, layer=args.layer)
        viz.render_scatter(result, out, subtitle=tower.description)
        width = max(len(n) for n in result.names)
        print(f"{'image':<{width}}  {'bytes/px':>8}  {'tokens':>6}")
        for name, c, t in zip(result.names, result.complexity, result.tokens):
            print(f"{name:<{width}}  {c:>8.3f}  {t:>6d}")
        print(f"Spearman rank correlation (complexity vs tokens): {result.spearman:.3f} over {len(result.names)} images")
        print(f"wrote {result.path}")
        return 0
    view = viz.merge_view(tower, args.image, layer=args.layer)
    rendered = viz.render_merge_view(view, out, subtitle=tower.description)
    per_layer = " -> ".join(map(str, view.tokens_per_layer))
    print(f"tokens per layer{' (incl. CLS)' if view.has_cls else ''}: {per_layer}")
    print(f"after layer {view.layer}: {view.num_groups} merge groups over {view.groups.size} patches")
    print(f"wrote {rendered.path} ({rendered.size[0]}x{rendered.size[1]})")
    return 0
