"""dymu's lmms-eval tasks: ``easy_vqa`` (the fixed class-balanced 260-question subset) and ``easy_vqa_full`` (the
whole easy-VQA test split, 9,673 questions), with data from the ``easy-vqa`` package (no hub, works offline), and
``dymu_complexity_vqa`` (1,040 generated questions over 4 image-complexity levels, :mod:`dymu.complexity_vqa`).

lmms-eval finds them through ``--include_path``; this folder is the path to give::

    python -m lmms_eval --include_path "$(python -m dymu.lmms_eval.tasks)" --tasks easy_vqa ...

(``python -m dymu.lmms_eval.tasks`` prints :func:`include_path`.) See docs/easy_vqa_task.md.
This package imports nothing from lmms-eval.
"""

from __future__ import annotations

from pathlib import Path

TASKS = ("easy_vqa", "easy_vqa_full", "dymu_complexity_vqa")


def include_path() -> str:
    """The folder to pass to lmms-eval's ``--include_path`` (it holds one sub-folder per task family)."""
    return str(Path(__file__).resolve().parent)
