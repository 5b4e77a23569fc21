"""Where does the small VLM lose colour? Linear probes of an easy-VQA image's shape colour (8 classes) and shape
(3 classes) on what its LLM is shown (``eval_scripts/small_vlm_colour_probe.py`` is the command, docs/results.md the
write-up). A module of its own: one study of the small VLM's vision side.

Features per image: ``pixels`` (mean RGB of the non-background pixels: the colour is there, trivially), ``dinov2``
(the vision tower's patch tokens at the projector's input layer, CLS dropped, mean-pooled) and ``projector`` (the
projector's outputs, mean-pooled). Labels come from the easy-VQA questions that name them. Probe: features
standardised on the train set, ``LogisticRegression(C=1, max_iter=3000)`` (scikit-learn).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
FEATURES = ("pixels", "dinov2", "projector")
TASKS = {"colour": COLOURS, "shape": SHAPES}


def image_labels(questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    """``{image id: {"colour": ..., "shape": ...}}`` from the questions that name them (images with both only)."""
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
    """The first ``n`` images (id order) that have both labels, as ``(path, labels)``; ValueError when fewer."""
    ids = [i for i in sorted(paths) if i in labels][:n]
    if len(ids) < n:
        raise ValueError(f"only {len(ids)} images have both a colour and a shape label; asked for {n}")
    return [(paths[i], labels[i]) for i in ids]


def features(model: nn.Module, processor, items: list[tuple[str, dict]], batch: int) -> dict[str, np.ndarray]:
    """``[n, C]`` per kind of :data:`FEATURES` for the images of ``items`` (a LLaVA-style VLM and its processor)."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in FEATURES}
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


def probe(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray, test_y: Sequence[str],
          classes: Sequence[str]) -> dict:
    """Test accuracy of a logistic-regression probe, overall and per class present in the test set."""
    from sklearn.linear_model import LogisticRegression  # optional (pip install scikit-learn)
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(train_x), train_y)
    pred = clf.predict(scaler.transform(test_x))
    per_class = {c: float(np.mean(pred[np.array(test_y) == c] == c)) for c in classes if c in set(test_y)}
    return {"accuracy": float(np.mean(pred == np.array(test_y))), "per_class": per_class}


def probe_all(f_train: dict[str, np.ndarray], f_test: dict[str, np.ndarray], train: list[tuple[str, dict]],
              test: list[tuple[str, dict]]) -> dict[str, dict]:
    """:func:`probe` of every task on every kind of features, keyed ``"<features>/<task>"``."""
    return {
        f"{name}/{task}": probe(f_train[name], [lab[task] for _, lab in train], f_test[name],
                                [lab[task] for _, lab in test], classes)
        for name in FEATURES for task, classes in TASKS.items()
    }
