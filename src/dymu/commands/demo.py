"""Run DToMe end to end on a small random ViT with built-in images (no downloads).

Finds per-layer merge thresholds on 16 generated images, then encodes a flat and a
textured image with them and prints the tokens kept after each layer: the flat image
keeps far fewer tokens than the textured one.

Example:
  dymu demo
  dymu demo --layers 8 --r-total 200 --schedule linear
"""

from __future__ import annotations

import argparse

NAME = "demo"
PATCH = 14  # the demo ViT's patch size
HELP = "DToMe on a small random ViT and two built-in images (no downloads)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dymu.commands._args import add_schedule_argument, int_at_least

    parser.add_argument("--layers", type=int_at_least(1), default=6, help="transformer blocks")
    parser.add_argument(
        "--image-size", type=int_at_least(2 * PATCH, f"2 patches of {PATCH} px"), default=224,
        help=f"image side in pixels, at least {2 * PATCH} (the ViT cuts it into {PATCH}-px patches)",
    )
    parser.add_argument("--r-total", type=int_at_least(0), default=150, help="tokens merged over all layers when finding")
    add_schedule_argument(parser, default="constant", help="merge schedule")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run(args: argparse.Namespace) -> int:
    from dymu.demo import format_result, run_demo

    tokens = (args.image_size // PATCH) ** 2
    if args.r_total >= tokens:
        raise ValueError(
            f"--r-total {args.r_total} merges all of the {tokens} patch tokens of a {args.image_size}-px image; "
            f"expected less than {tokens}"
        )
    result = run_demo(layers=args.layers, image_size=args.image_size, r_total=args.r_total, schedule=args.schedule, seed=args.seed)
    print(format_result(result))
    return 0
