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
HELP = "DToMe on a small random ViT and two built-in images (no downloads)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (default: 6)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--r-total", type=int, default=150, help="tokens merged over all layers when finding (default: 150)")
    parser.add_argument(
        "--schedule", choices=["constant", "linear", "reverse_linear"], default="constant", help="merge schedule"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")


def run(args: argparse.Namespace) -> int:
    from dymu.demo import format_result, run_demo

    result = run_demo(layers=args.layers, image_size=args.image_size, r_total=args.r_total, schedule=args.schedule, seed=args.seed)
    print(format_result(result))
    return 0
