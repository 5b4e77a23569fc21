"""easy-VQA for lmms-eval: the subset rule, answer normalisation and the task hooks of ``easy_vqa.yaml`` /
``easy_vqa_full.yaml``.

Data: the ``easy-vqa`` package (``pip install easy-vqa``; questions, answers and PNG images ship inside it), no hub.
The YAMLs load a stand-in dataset (lmms-eval always calls ``datasets.load_dataset``; the ``text`` builder reads the
task's own YAML, a file that is always there, offline) and :func:`process_docs` replaces it with the questions.

Subset rule (fixed, class-balanced; :func:`balanced_subset`): all easy-VQA **test** questions, indices 0…9672 in
the package's order, shuffled with ``random.Random(seed)``; per answer class (13 classes) the first ``per_class``
questions in that order are kept, in the shuffled order. ``easy_vqa``: 20 per class, seed 0 → 260 questions;
``easy_vqa_full``: every test question (9,673), in the same shuffled order. ``eval_scripts/small_vlm_easyvqa.py``
uses this same definition.

Metric: ``exact_match`` — the normalised answer (:func:`normalise`: lowercase, punctuation stripped, whitespace
collapsed) equals the one-word ground truth.

This module imports neither lmms-eval nor easy-vqa at import time.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

PER_CLASS = 20  # easy_vqa: 13 classes x 20 = 260 questions
SEED = 0


def normalise(text: str) -> str:
    """Lowercase, ASCII punctuation removed, whitespace collapsed and stripped."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def balanced_subset(per_class: int | None, seed: int = SEED) -> list[dict]:
    """The fixed class-balanced subset of the easy-VQA test split (see the module docstring).

    Rows ``{"index", "question", "answer", "image_id", "image"}`` (``index`` into the package's test questions,
    ``image`` the PNG path), in the shuffled order. ``per_class=None``: every question (no cap).
    """
    import easy_vqa

    qs, ans, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    order = list(range(len(qs)))
    random.Random(seed).shuffle(order)
    taken: dict[str, int] = {}
    rows = []
    for i in order:
        a = ans[i]
        if per_class is None or taken.get(a, 0) < per_class:
            taken[a] = taken.get(a, 0) + 1
            rows.append({"index": i, "question": qs[i], "answer": a, "image_id": int(ids[i]),
                         "image": paths[int(ids[i])]})
    return rows


# ---------------------------------------------------------------------------------------------- lmms-eval hooks
def _dataset(rows: list[dict]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows)


def process_docs(dataset: Any) -> Any:
    """``easy_vqa``: the stand-in split replaced by the 260-question balanced subset."""
    return _dataset(balanced_subset(PER_CLASS, SEED))


def process_docs_full(dataset: Any) -> Any:
    """``easy_vqa_full``: the stand-in split replaced by all 9,673 test questions (shuffled order)."""
    return _dataset(balanced_subset(None, SEED))


def doc_to_visual(doc: dict) -> list[Any]:
    from dymu.data import load_image  # EXIF orientation, alpha: as every dymu entry point reads images

    return [load_image(doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question alone (the model's chat template puts the image first); optional ``pre_prompt`` /
    ``post_prompt`` from ``lmms_eval_specific_kwargs`` (none by default)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(normalise(str(results[0])) == normalise(doc["answer"]))}
