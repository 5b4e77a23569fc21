"""The visual token record of an lmms-eval run: each request's visual token counts, gathered over processes,
summarised overall and per task, and written as ``<date>_dymu_tokens.json`` next to lmms-eval's
``<date>_results.json`` (or to ``tokens_path=``).

lmms-eval 0.7.3 tells a model neither its output folder nor the date that names the results file, and it writes
that file only after the model's last call (``clean``). So, run from lmms-eval's command line with
``--output_path``, the record is written when the process ends (``atexit``): into the folder of the results file
that this command wrote (``<output_path>/<model>/<date>_results.json``, the one whose ``config`` holds this
command's ``--model`` and ``--model_args``), under the same date.
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
import time
from pathlib import Path
from typing import Any

from dymu import evaluation
from dymu.distributed import all_gather_objects

Samples = dict[str, dict[tuple[str, Any], list[int]]]  # task -> (split, doc_id) -> visual tokens per image


class TokenRecord:
    """Each request's visual token counts (per image), by task and document."""

    def __init__(self, samples: Samples | None = None) -> None:
        self.samples: Samples = samples if samples is not None else {}

    def add(self, task: str, split: str, doc_id: Any, counts: list[int]) -> None:
        self.samples.setdefault(task, {})[(str(split), doc_id)] = list(counts)

    def gathered(self) -> "TokenRecord":
        """Every process's samples together (lmms-eval gives each process a share of the requests)."""
        merged: Samples = {}
        for part in all_gather_objects(self.samples):
            for task, samples in (part or {}).items():
                merged.setdefault(task, {}).update(samples)
        return TokenRecord(merged)

    def summary(self, model: str, settings: dict[str, Any], full_tokens_per_image: int | None) -> dict[str, Any]:
        """Mean ± std (and min, max) overall and per task, with every sample's counts, and the backend settings."""
        tasks, everything = {}, []
        for task in sorted(self.samples):
            samples = sorted(self.samples[task].items(), key=lambda kv: (kv[0][0], str(type(kv[0][1])), kv[0][1]))
            counts = [c for _, cs in samples for c in cs]
            everything += counts
            tasks[task] = {
                **evaluation.token_stats(counts),
                "samples": [{"split": s, "doc_id": d, "visual_tokens": cs} for (s, d), cs in samples],
            }
        return {
            "model": model,
            "settings": settings,
            "full_tokens_per_image": full_tokens_per_image,
            "overall": evaluation.token_stats(everything),
            "tasks": tasks,
        }


def write_record(path: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=str))
    return path


def lmms_eval_command(argv: list[str] | None = None) -> dict[str, str] | None:
    """``--output_path``, ``--model`` and ``--model_args`` of the lmms-eval command line this process runs, or None
    (not lmms-eval's command line, or no output path: lmms-eval then writes no results file either)."""
    if "lmms_eval.__main__" not in sys.modules:  # `python -m lmms_eval` and the `lmms-eval` command both load it
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--output_path", "--model", "--model_args"):
        parser.add_argument(flag, default="")
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not known.output_path:
        return None
    return {"output_path": known.output_path, "model": known.model, "model_args": known.model_args}


def results_file_of(command: dict[str, str], since: float) -> Path | None:
    """The newest ``<output_path>/<model>/<date>_results.json`` written since ``since`` (a ``time.time()``) whose
    ``config`` names this command's model and model args."""
    candidates = [p for p in Path(command["output_path"]).glob("*/*_results.json") if p.stat().st_mtime >= since]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            config = json.loads(path.read_text()).get("config", {})
        except (OSError, ValueError):
            continue
        if config.get("model") == command["model"] and str(config.get("model_args", "")) == command["model_args"]:
            return path
    return None


def write_next_to_results_at_exit(summary: dict[str, Any], command: dict[str, str], since: float) -> None:
    """Once the process ends (lmms-eval has written its results by then), write ``summary`` next to them."""

    def write() -> None:
        results = results_file_of(command, since)
        if results is None:
            print(f"{summary['model']}: no results file of this run under {command['output_path']}: the visual "
                  "token record is not written (give tokens_path= to choose where it goes)", file=sys.stderr)
            return
        target = results.with_name(results.name.replace("_results.json", "_dymu_tokens.json"))
        try:
            print(f"{summary['model']}: visual token record written to {write_record(target, summary)}",
                  file=sys.stderr)
        except OSError as err:
            print(f"{summary['model']}: cannot write the visual token record to {target}: {err}", file=sys.stderr)

    atexit.register(write)


def started() -> float:
    """A start time to compare results files' modification times with (a second early: coarse file clocks)."""
    return time.time() - 1.0
