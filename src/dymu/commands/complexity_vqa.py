"""Write the complexity VQA set (:mod:`dymu.complexity_vqa`): scenes of 1 to 16 shapes, one-word questions about
one object, four complexity levels, balanced answers. Deterministic for a seed: anyone can draw a fresh test set
from another seed.

OUT gets ``images/NNNNNN.png``, ``questions.json`` (``dymu eval``'s format, plus ``level``, ``objects``, ``qtype``,
``background`` per question) and ``scenes.json`` (every object's shape, colour and box).

Examples:
  dymu complexity-vqa --seed 1 --count 1040 --out data/cvqa_test_seed1
  dymu complexity-vqa --seed 100 --count 4000 --questions-per-image 4 --out data/cvqa_train
"""

from __future__ import annotations

import argparse
from collections import Counter

from dymu.complexity_vqa import generate, write

NAME = "complexity-vqa"
HELP = "write the generated VQA set of varying image complexity (images + questions JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, required=True, help="random seed (the same seed gives the same set)")
    parser.add_argument("--count", type=int, required=True, help="images (52 = one balanced block of levels x answers)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--questions-per-image", type=int, default=1,
                        help="1: the balanced question only (evaluation); more: extra questions the scene supports")
    parser.add_argument("--textured", type=float, default=0.25, help="fraction of images with a textured background")


def run(args: argparse.Namespace) -> int:
    items = generate(args.seed, args.count, questions_per_image=args.questions_per_image, textured=args.textured)
    path = write(items, args.out)
    levels = Counter(it.level for it in items)
    questions = sum(len(it.questions) for it in items)
    print(f"wrote {len(items)} images, {questions} questions to {path} "
          f"(images per level: {', '.join(f'{k}: {levels[k]}' for k in sorted(levels))})")
    return 0
