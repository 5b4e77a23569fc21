"""Why is the small VLM weak on colour? Linear probes of colour and shape on what its LLM is shown.

The small VLM (docs/results.md) answers shape questions almost always right but misses many colour questions
(brown, yellow, teal). This script asks where colour gets lost: a logistic-regression probe per image predicts the
shape's colour (8 classes) and its shape (3 classes) from

* ``pixels``: the mean RGB of the pixels that are not background (the colour is there, trivially);
* ``dinov2``: DINOv2-S's last-block patch tokens (what the projector receives, CLS dropped), mean-pooled;
* ``projector``: the trained projector's outputs (what the LLM receives), mean-pooled.

Labels come from the easy-VQA questions of each image ("what color is the shape?", "what is the blue shape?",
"what shape is in the image?", ...). Train: the first ``--train`` train images (package order) that have both
labels; test: the first ``--test`` such test images. Features standardised on the train set;
``LogisticRegression(C=1, max_iter=3000)`` (scikit-learn).

The study is :mod:`dymu.studies.colour_probe`; this script prints its table.

Run: ``python eval_scripts/small_vlm_colour_probe.py --train 800 --test 400 --out docs/small_vlm_colour_probe.json``
(about two minutes on 2 CPU cores; needs ``dymu weights install dinov2-small smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dymu.small_vlm import build_small_vlm
from dymu.studies.colour_probe import features, image_labels, pick, probe_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python eval_scripts/small_vlm_colour_probe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=800, help="train images (default 800)")
    p.add_argument("--test", type=int, default=400, help="test images (default 400)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import easy_vqa  # optional (pip install easy-vqa)

    model, processor = build_small_vlm("default")
    try:
        train = pick(easy_vqa.get_train_image_paths(), image_labels(*easy_vqa.get_train_questions()), args.train)
        test = pick(easy_vqa.get_test_image_paths(), image_labels(*easy_vqa.get_test_questions()), args.test)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    f_train, f_test = features(model, processor, train, args.batch), features(model, processor, test, args.batch)
    probes = probe_all(f_train, f_test, train, test)
    for key, res in probes.items():
        name, task = key.split("/")
        per = ", ".join(f"{c} {100 * v:.0f}" for c, v in res["per_class"].items())
        print(f"{name:<10} {task:<7} {100 * res['accuracy']:5.1f}%   ({per})")
    results = {"train_images": args.train, "test_images": args.test, "probes": probes}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
