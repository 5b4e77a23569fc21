"""The rows of the complexity-VQA table (``eval_scripts/complexity_vqa_table.py``): the test questions drawn from
:func:`dymu.complexity_vqa.generate`, the row runner (resumable: the results file is written after every row and
finished rows are skipped), and McNemar's test of DyMU against fixed-count ToMe at each budget.

Rows and their labels are those of :mod:`dymu.evaluation.easy_vqa_rows` (``full``, ``dymu-<K>-fast``,
``tome@<K>-fast``, ``prune@<K>``, ``random@<K>``), with the mix model's threshold sets (``sets="mix-"``) by
default; the questions carry their complexity ``level``, so every row records accuracy and visual tokens per level
and, per question, whether its answer was right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dymu.complexity_vqa import generate, records
from dymu.evaluation.easy_vqa_report import find_row
from dymu.evaluation.easy_vqa_rows import Row, dymu_means, evaluate_row, put_row
from dymu.evaluation.stats import mcnemar

BUDGETS = (28, 88, 176)  # the mix model's DyMU-low/mid/high threshold sets (<K>out)
DEFAULT_ROWS = ("full", *(f"dymu-{k}-fast" for k in BUDGETS),
                *(r for k in BUDGETS for r in (f"tome@{k}-fast", f"prune@{k}", f"random@{k}")))


def question_rows(seed: int, count: int) -> list[dict]:
    """The test questions: one per generated image (``generate(seed, count)``), as row dicts ``{"index",
    "question", "answer", "image", "level", "qtype", "objects", "background", "item"}`` with the image in
    memory (``index`` = ``item``, the image's index in the set)."""
    items = generate(seed, count)
    return [dict(rec, index=rec["item"], image=items[rec["item"]].image) for rec in records(items)]


def new_results(rows: list[dict], seed: int, count: int, projector: str) -> dict:
    """An empty results file for the question ``rows`` (the generator call, its questions per level, the model)."""
    levels = [r["level"] for r in rows]
    return {"subset": {"rule": f"dymu.complexity_vqa.generate(seed={seed}, count={count}), the first question of "
                       "each image", "seed": seed, "count": count, "n": len(rows),
                       "per_level": {str(v): levels.count(v) for v in sorted(set(levels))}},
            "projector": projector, "threads": torch.get_num_threads(), "rows": []}


def check_same_set(results: dict, seed: int, count: int) -> None:
    """Refuse to add rows to a results file of another question set (ValueError naming both)."""
    have = (results["subset"].get("seed"), results["subset"].get("count"))
    if have != (seed, count):
        raise ValueError(f"the results file holds seed {have[0]}, count {have[1]}; asked for seed {seed}, count "
                         f"{count}: use another --out or the same set")


def pending(results: dict, labels: list[str]) -> list[str]:
    """The ``labels`` whose row is not in ``results`` yet or did not finish (a resumed run does only these)."""
    return [x for x in labels if not (find_row(results, x) or {}).get("complete")]


def run_rows(model: nn.Module, processor: Any, rows: list[dict], labels: list[str], results: dict, out: Path, *,
             batch: int = 8, sets: str = "mix-", deadline: float | None = None,
             command: Callable[[str], str] | None = None, root: Path | None = None) -> list[str]:
    """Evaluate each row of ``labels`` not finished in ``results`` (in order), writing ``out`` after every row;
    ``command(label)``: the command line recorded with the row. Returns the labels evaluated."""
    done = []
    for label in pending(results, labels):
        row = Row(label, dymu_means(results), sets=sets)
        row.enable(model)
        try:
            entry = evaluate_row(model, processor, rows, batch, label, deadline, row=row)
        finally:
            row.disable(model)
        if entry["n"] == 0:  # stopped by the deadline before its first batch: nothing to keep
            break
        entry.update(row.info(root))
        if command is not None:
            entry["command"] = command(label)
        put_row(results, entry)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        done.append(label)
    return done


def paired_tests(results: dict) -> list[dict]:
    """McNemar DyMU-K (VTU fast) vs ToMe at DyMU-K's mean (VTU fast), for each K with both rows complete: over
    all questions (``level`` "all") and per level; ``b``: DyMU right and ToMe wrong, ``c``: the reverse, ``n``:
    b + c (:func:`dymu.evaluation.stats.mcnemar`), ``questions``: the questions compared."""
    tests = []
    for k in sorted(dymu_means(results)):
        dymu, tome = find_row(results, f"dymu-{k}-fast"), find_row(results, f"tome@{k}-fast")
        if tome is None or not tome["complete"]:
            continue
        right = {p["index"]: p for p in tome["predictions"]}
        pairs = [(p["level"], p["correct"], right[p["index"]]["correct"]) for p in dymu["predictions"]]
        for level in ["all", *sorted({lv for lv, _, _ in pairs})]:
            sel = [(a, b) for lv, a, b in pairs if level == "all" or lv == level]
            test = mcnemar([a for a, _ in sel], [b for _, b in sel])
            tests.append({"budget": k, "level": str(level), "dymu": dymu["row"], "tome": tome["row"],
                          "questions": len(sel), "dymu_correct": sum(a for a, _ in sel),
                          "tome_correct": sum(b for _, b in sel), **test})
    return tests

