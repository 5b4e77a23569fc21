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

Run: ``python eval_scripts/small_vlm_colour_probe.py --train 800 --test 400 --out docs/small_vlm_colour_probe.json``
(about two minutes on 2 CPU cores; needs ``dymu weights install dinov2-small smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def image_labels(questions, answers, image_ids) -> dict[int, dict[str, str]]:
    """``{image id: {"colour": ..., "shape": ...}}`` from the questions that name them."""
    labels: dict[int, dict[str, str]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        lab = labels.setdefault(int(i), {})
        if re.fullmatch(r"what (color is|is the color of) the \w+\?", q):
            lab["colour"] = a
            named = q.split()[-1].rstrip("?")
            if named in SHAPES:
                lab["shape"] = named
        elif m := re.fullmatch(r"what is the (\w+) shape\?", q):
            lab["colour"], lab["shape"] = m[1], a
        elif q.startswith("what shape"):
            lab["shape"] = a
    return {i: lab for i, lab in labels.items() if lab.get("colour") in COLOURS and lab.get("shape") in SHAPES}


def pick(paths: dict, labels: dict, n: int) -> list[tuple[str, dict]]:
    ids = [i for i in sorted(paths) if i in labels][:n]
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} images have both a colour and a shape label; asked for {n}")
    return [(paths[i], labels[i]) for i in ids]


def features(model, processor, items, batch: int) -> dict[str, np.ndarray]:
    from PIL import Image
    from tqdm import tqdm

    out: dict[str, list[np.ndarray]] = {"pixels": [], "dinov2": [], "projector": []}
    vlm = model.model
    for s in tqdm(range(0, len(items), batch), desc="features", unit="batch"):
        images = [Image.open(p).convert("RGB") for p, _ in items[s:s + batch]]
        for img in images:
            arr = np.asarray(img, dtype=np.float32).reshape(-1, 3)
            fg = arr[(arr < 250).any(1)]  # easy-VQA backgrounds are white
            out["pixels"].append(fg.mean(0) if len(fg) else arr.mean(0))
        pixel_values = processor.image_processor(images=images, return_tensors="pt").pixel_values
        with torch.no_grad():
            hidden = vlm.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            patches = hidden[model.config.vision_feature_layer][:, 1:]  # what the projector receives
            projected = vlm.multi_modal_projector(patches)
        out["dinov2"].extend(patches.mean(1).numpy())
        out["projector"].extend(projected.mean(1).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def probe(train_x, train_y, test_x, test_y, classes) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(train_x), train_y)
    pred = clf.predict(scaler.transform(test_x))
    per_class = {c: float(np.mean(pred[np.array(test_y) == c] == c)) for c in classes if c in set(test_y)}
    return {"accuracy": float(np.mean(pred == np.array(test_y))), "per_class": per_class}


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
    import easy_vqa

    from dymu.small_vlm import build_small_vlm

    model, processor = build_small_vlm("default")
    train = pick(easy_vqa.get_train_image_paths(), image_labels(*easy_vqa.get_train_questions()), args.train)
    test = pick(easy_vqa.get_test_image_paths(), image_labels(*easy_vqa.get_test_questions()), args.test)
    f_train, f_test = features(model, processor, train, args.batch), features(model, processor, test, args.batch)
    results = {"train_images": args.train, "test_images": args.test, "probes": {}}
    for name in ("pixels", "dinov2", "projector"):
        for task, classes in (("colour", COLOURS), ("shape", SHAPES)):
            res = probe(f_train[name], [lab[task] for _, lab in train], f_test[name], [lab[task] for _, lab in test],
                        classes)
            results["probes"][f"{name}/{task}"] = res
            per = ", ".join(f"{c} {100 * v:.0f}" for c, v in res["per_class"].items())
            print(f"{name:<10} {task:<7} {100 * res['accuracy']:5.1f}%   ({per})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
