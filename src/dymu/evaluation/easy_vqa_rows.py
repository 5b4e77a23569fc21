"""The rows of the small VLM's easy-VQA table (``eval_scripts/small_vlm_easyvqa.py``) and of its complexity-VQA
table (:mod:`dymu.evaluation.complexity_rows`): what a row label means, how a row sets the model up, answers the
questions and is timed, and the results file the rows go into.

Row labels: ``full`` (the stock model); ``dymu-<K>[-raster]-<vtu>`` (DyMU with the small VLM's ``<K>out``
thresholds, authors' or raster token order); ``tome@<K>-<vtu>``, ``prune@<K>``, ``random@<K>`` (the
:mod:`dymu.baselines` methods, each keeping DyMU-K's mean count, read from the ``dymu-<K>-fast`` row).
A question row is a dict ``{"index", "question", "answer", "image"}``
(:func:`dymu.lmms_eval.tasks.easy_vqa.utils.balanced_subset`); rows that also carry a ``level`` (and ``qtype``)
get per-level results (:func:`evaluate_row`).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dymu.evaluation.easy_vqa_report import find_row
from dymu.evaluation.inference import chat_inputs
from dymu.evaluation.prompts import Prompt
from dymu.evaluation.stats import grouped_accuracy, wilson
from dymu.lmms_eval.tasks.easy_vqa.utils import normalise
from dymu.small_vlm import build_small_vlm, threshold_path
from dymu.vlm import disable_dymu, enable_dymu, generate_with_counts, load_llava

FULL_TOKENS = 256  # the small VLM's visual tokens per image (DINOv2-S/14 at 224 px)
MAX_NEW_TOKENS = 6  # every answer is one word


def thresholds_path(k: int, raster: bool = False, sets: str = "") -> Path:
    """The small VLM's DyMU thresholds that keep about ``k`` tokens (authors' or raster token order); ``sets``:
    ``""`` for the easy-VQA model's, ``"mix-"`` for the mix model's (:func:`dymu.small_vlm.threshold_path`).
    ValueError naming the shipped sets when there is none."""
    try:
        return threshold_path(f"{sets}{k}out{'-raster' if raster else ''}")
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None


class Row:
    """One table row: how to set the model up and how to build its inputs; ``means``: DyMU-K's mean visual
    tokens per image by K (the baselines keep that many); ``sets``: whose thresholds DyMU rows use
    (:func:`thresholds_path`). A bad label raises ValueError naming it."""

    def __init__(self, label: str, means: dict[int, float], sets: str = "") -> None:
        self.label, self.sets = label, sets
        self.kind, self.k, self.vtu, self.raster, self.count = "full", None, None, False, FULL_TOKENS
        if label == "full":
            return
        m = re.fullmatch(r"dymu-(\d+)(-raster)?-(fast|exact|off)", label)
        if m:
            self.kind, self.k, self.raster, self.vtu = "dymu", int(m[1]), bool(m[2]), m[3]
            try:
                thresholds_path(self.k, self.raster, sets)
            except ValueError as err:
                raise ValueError(f"{label}: no thresholds ({err})") from None
            return
        m = re.fullmatch(r"(tome|prune|random)@(\d+)(?:-(fast|exact|off))?", label)
        if not m or (m[1] == "tome") != (m[3] is not None):
            raise ValueError(f"unknown row {label!r}: expected full, dymu-<K>[-raster]-<vtu>, tome@<K>-<vtu>, "
                             "prune@<K>, random@<K>")
        self.kind, self.k, self.vtu = m[1], int(m[2]), m[3]
        if self.k not in means:
            raise ValueError(f"{label} needs DyMU-{self.k}'s mean token count: run dymu-{self.k}-fast first")
        self.count = round(means[self.k])

    def enable(self, model: nn.Module) -> None:
        if self.kind == "dymu":
            enable_dymu(model, thresholds_path(self.k, self.raster, self.sets), vtu=self.vtu,
                        token_order="raster" if self.raster else "single")
        elif self.kind != "full":
            enable_dymu(model, None, vtu=self.vtu, method=self.kind, token_budget=self.count)

    def disable(self, model: nn.Module) -> None:
        disable_dymu(model)

    def inputs(self, model: nn.Module, processor: Any, rows: list[dict]) -> dict:
        """One single-turn chat per question (image first, the bare question), left-padded."""
        inputs = dict(chat_inputs(model, processor, [Prompt(r["question"], [r["image"]]) for r in rows]))
        if self.kind == "random":  # seeded per question: the same subset whatever the batch
            inputs["selection_seeds"] = [r["index"] for r in rows]
        return inputs

    def info(self, root: Path | None = None) -> dict:
        """What the results file records about the row; the thresholds path relative to ``root`` when inside it."""
        out: dict[str, Any] = {"kind": self.kind, "vtu": self.vtu}
        if self.kind == "dymu":
            path = thresholds_path(self.k, self.raster, self.sets)
            out["thresholds"] = str(path.relative_to(root) if root and path.is_relative_to(root) else path)
            out["token_order"] = "raster" if self.raster else "single"
        elif self.kind != "full":
            out["matched_to"] = f"dymu-{self.k}-fast"
            out["tokens_per_image"] = self.count
        return out


@torch.no_grad()
def answer_batch(model: nn.Module, processor: Any, rows: list[dict], max_new_tokens: int = MAX_NEW_TOKENS,
                 row: Row | None = None) -> tuple[list[str], list[int]]:
    """Greedy answers and visual tokens per question (as the call reports them; 256 for the stock model)."""
    inputs = (row or Row("full", {})).inputs(model, processor, rows)
    out, tokens = generate_with_counts(model, inputs, max_new_tokens=max_new_tokens, do_sample=False)
    decoded = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [d.strip() for d in decoded], list(tokens.counts)


@torch.no_grad()
def prefill_ratio(model: nn.Module, processor: Any, rows: list[dict], row: Row, reps: int) -> dict:
    """Median seconds of one forward (encoder + prefill, last logits only) of ``rows``, full and ``row``
    alternately; the ratio full / row."""
    full = Row("full", {})
    times: dict[str, list[float]] = {"full": [], "row": []}
    for _ in range(reps):
        for name, r in (("full", full), ("row", row)):
            r.enable(model)
            try:
                inputs = r.inputs(model, processor, rows)
                start = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                times[name].append(time.perf_counter() - start)
            finally:
                r.disable(model)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"prefill_s_full": round(med["full"], 4), "prefill_s": round(med["row"], 4),
            "prefill_ratio": round(med["full"] / med["row"], 3)}


def evaluate_row(model: nn.Module, processor: Any, rows: list[dict], batch: int, label: str,
                 deadline: float | None = None, row: Row | None = None) -> dict:
    """Answer ``rows`` in batches (no new batch after the ``deadline`` timestamp); the row's results entry:
    accuracy with its Wilson interval, visual tokens mean ± std, per-class counts and every prediction. Rows with a
    ``level`` add ``per_level`` (:func:`dymu.evaluation.stats.grouped_accuracy`) and, per prediction, its level,
    question type, visual tokens and whether it was right (for paired tests)."""
    preds, counts = [], []
    start = time.perf_counter()
    for s in tqdm(range(0, len(rows), batch), desc=label, file=sys.stdout):
        if deadline is not None and time.time() > deadline:
            break
        p, c = answer_batch(model, processor, rows[s:s + batch], row=row)
        preds += p
        counts += c
    n = len(preds)
    correct = [normalise(p) == normalise(r["answer"]) for p, r in zip(preds, rows)]
    k = sum(correct)
    lo, hi = wilson(k, n)
    t = torch.tensor(counts, dtype=torch.float32) if counts else torch.zeros(1)
    per_class: dict[str, list[int]] = {}
    for ok, r in zip(correct, rows):
        per_class.setdefault(r["answer"], [0, 0])
        per_class[r["answer"]][0] += int(ok)
        per_class[r["answer"]][1] += 1
    entry = {
        "row": label, "n": n, "correct": k, "accuracy": k / max(1, n), "wilson95": [lo, hi],
        "visual_tokens_mean": float(t.mean()), "visual_tokens_std": float(t.std()) if n > 1 else 0.0,
        "seconds": round(time.perf_counter() - start, 1), "complete": n == len(rows),
        "per_class": per_class,
        "predictions": [{"index": r["index"], "pred": p, "answer": r["answer"]} for p, r in zip(preds, rows)],
    }
    if rows and "level" in rows[0]:  # only sets with levels: the easy-VQA results file stays as it was
        for record, r, ok, c in zip(entry["predictions"], rows, correct, counts):
            record.update(level=r["level"], qtype=r.get("qtype"), tokens=c, correct=ok)
        entry["per_level"] = grouped_accuracy(correct, counts, [r["level"] for r in rows[:n]])
    return entry


def load_model(checkpoint: str | None, via_load_llava: bool) -> tuple[nn.Module, Any]:
    """The trained model: built with :func:`dymu.small_vlm.build_small_vlm`, saved with ``save_pretrained`` and
    reloaded through ``dymu.vlm.load_llava`` (``via_load_llava``), or used as built."""
    model, processor = build_small_vlm(checkpoint or "default")
    if via_load_llava:
        tmp = tempfile.mkdtemp(prefix="small_vlm_")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        del model
        model, processor = load_llava(tmp)
    return model.eval(), processor


# ---------------------------------------------------------------------------------------------- the results file
def new_results(rows: list[dict], per_class: int, seed: int) -> dict:
    """An empty results file for the question ``rows`` (the subset rule, its size and question indices)."""
    return {"subset": {"rule": f"easy-VQA test questions shuffled with random.Random({seed}); per answer "
                       f"class the first {per_class}", "n": len(rows), "indices": [r["index"] for r in rows]},
            "threads": torch.get_num_threads(), "rows": []}


def dymu_means(results: dict) -> dict[int, float]:
    """DyMU-K's mean visual tokens per image, by K, from the complete ``dymu-<K>-fast`` rows."""
    return {int(m[1]): r["visual_tokens_mean"] for r in results["rows"]
            if (m := re.fullmatch(r"dymu-(\d+)-fast", r["row"])) and r["complete"]}


def put_row(results: dict, entry: dict) -> None:
    """Add a row's entry (replacing one with its label, moved to the end); a row other than ``full`` gets the
    number of its answers equal to the full row's (normalised), when the file has a full row."""
    full = find_row(results, "full")
    if full is not None and entry["row"] != "full":
        entry["same_answer_as_full"] = sum(normalise(a["pred"]) == normalise(b["pred"])
                                           for a, b in zip(entry["predictions"], full["predictions"]))
    results["rows"] = [r for r in results["rows"] if r["row"] != entry["row"]] + [entry]


def utc_deadline(hh_mm: str) -> float:
    """The timestamp of the next ``HH:MM`` UTC (a time already past today means tomorrow's)."""
    hh, mm = map(int, hh_mm.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if when <= now:
        when += dt.timedelta(days=1)
    return when.timestamp()
