"""Complexity VQA for lmms-eval: the hooks of ``dymu_complexity_vqa.yaml``.

The questions are generated in memory (:func:`dymu.complexity_vqa.generate`, one question per image) from the
YAML's ``metadata`` (``seed``, ``count``); the images travel as PIL images inside the ``datasets`` split. Metrics:
``exact_match`` (normalised answer equals the one-word ground truth, as easy_vqa's) over all questions, and
``level_0`` … ``level_3``, the same accuracy over the questions of one complexity level.

This module imports neither lmms-eval nor the generator at import time.
"""

from __future__ import annotations

from typing import Any

from dymu.lmms_eval.tasks.easy_vqa.utils import normalise

SEED = 1
COUNT = 1040  # 20 blocks of 4 levels x 13 answers


def rows(seed: int = SEED, count: int = COUNT) -> list[dict[str, Any]]:
    """The task's documents: ``{"index", "question", "answer", "level", "objects", "qtype", "background", "image"}``."""
    from dymu.complexity_vqa import generate

    return [{"index": it.index, "question": it.questions[0].question, "answer": it.questions[0].answer,
             "level": it.level, "objects": len(it.objects), "qtype": it.questions[0].qtype,
             "background": it.background, "image": it.image}
            for it in generate(seed, count)]


def process_docs(dataset: Any, seed: int = SEED, count: int = COUNT) -> Any:
    """The stand-in split replaced by the generated questions."""
    import datasets

    return datasets.Dataset.from_list(rows(seed, count))


def doc_to_visual(doc: dict) -> list[Any]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question alone (the model's chat template puts the image first)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    correct = float(normalise(str(results[0])) == normalise(doc["answer"]))
    return {"exact_match": correct, **{f"level_{k}": (int(doc["level"]), correct) for k in range(4)}}


def _level(k: int, items: list[tuple[int, float]]) -> float:
    picked = [c for lvl, c in items if lvl == k]
    return sum(picked) / len(picked) if picked else float("nan")


def level_0(items: list[tuple[int, float]]) -> float:
    return _level(0, items)


def level_1(items: list[tuple[int, float]]) -> float:
    return _level(1, items)


def level_2(items: list[tuple[int, float]]) -> float:
    return _level(2, items)


def level_3(items: list[tuple[int, float]]) -> float:
    return _level(3, items)
