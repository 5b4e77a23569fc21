"""The paper's results table from lmms-eval result files: score per benchmark, average % of the full model,
mean ± std visual tokens (``eval_scripts/make_table.py`` is the command line).

A *run* is one setting (``full``, ``low``, ``mid``, ``high`` …): a folder searched recursively for lmms-eval's
``<date>_results.json`` files (several files are merged; for a task in more than one, the newest file wins) and
the plugin's ``<date>_dymu_tokens.json`` records next to them. Visual tokens: the per-sample counts of the token
records (one entry per image, each (task, split, document) once); a results file without a record contributes the
summary the plugin put in its ``throughput`` section. Works without lmms-eval installed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dymu.evaluation import pooled_stats, token_stats


@dataclass(frozen=True)
class Benchmark:
    label: str  # column name
    task: str  # lmms-eval task name
    metric: str  # key in results[task], "<metric>,<filter>"
    scale: float = 1.0  # multiply to get the paper's unit (0..1 accuracies -> %)
    decimals: int = 1


# LLaVA-1.5 benchmarks of the DyMU paper (Table 1), as lmms-eval 0.7.3 names them (metric keys from the task YAMLs)
BENCHMARKS: list[Benchmark] = [
    Benchmark("GQA", "gqa", "exact_match,none", 100),
    Benchmark("MMB", "mmbench_en_dev", "gpt_eval_score,none"),  # already %, GPT-assisted choice extraction
    Benchmark("MME", "mme", "mme_perception_score,none", 1, 0),  # perception score (sum of subtasks)
    Benchmark("POPE", "pope", "pope_f1_score,none", 100),
    Benchmark("SQA-I", "scienceqa_img", "exact_match,none", 100),
    Benchmark("SEED-I", "seedbench", "seed_image,none", 100),
    Benchmark("TextVQA", "textvqa_val", "exact_match,none", 100),
    Benchmark("MMVet", "mmvet", "gpt_eval_score,none"),  # GPT-judged, already %
    Benchmark("LLaVA-W", "llava_in_the_wild", "gpt_eval_llava_all,none"),  # GPT-judged, already %
]

# DyMU paper, LLaVA-1.5-7B (the numbers to compare with; see docs/evaluation.md)
PAPER_LLAVA15_7B: dict[str, dict[str, Any]] = {
    "full": {"tokens": "576", "avg": 100.0,
             "scores": dict(zip([b.label for b in BENCHMARKS], [62.0, 64.6, 1506, 86.9, 69.4, 66.2, 58.3, 30.7, 63.5]))},
    "low": {"tokens": "89 ± 27", "avg": 97.7,
            "scores": dict(zip([b.label for b in BENCHMARKS], [60.8, 62.1, 1438, 86.3, 69.3, 65.0, 53.1, 30.0, 62.9]))},
    "mid": {"tokens": "195 ± 47", "avg": 99.1, "scores": {}},
    "high": {"tokens": "394 ± 57", "avg": 100.4, "scores": {}},
}
SETTING_ORDER = ["full", "low", "mid", "high"]


@dataclass
class Run:
    label: str
    scores: dict[str, float] = field(default_factory=dict)  # benchmark label -> score (paper unit)
    tokens: dict[str, Any] = field(default_factory=dict)  # token_stats / pooled_stats
    files: list[Path] = field(default_factory=list)


def _date_key(path: Path) -> str:
    return path.name  # lmms-eval names files "<date>_results.json": name order is time order


def results_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no results at {path}")
    files = sorted(path.rglob("*_results.json"), key=_date_key)
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {path}")
    return files


def load_run(label: str, path: str | Path, benchmarks: Sequence[Benchmark]) -> Run:
    """Scores and visual token statistics of one setting from its results files (newest first wins per task)."""
    run = Run(label)
    seen_tasks: set[str] = set()
    samples: dict[tuple[str, str, str], list[int]] = {}
    summaries: list[dict[str, Any]] = []
    by_task = {b.task: b for b in benchmarks}
    for file in reversed(results_files(Path(path))):
        data = json.loads(file.read_text())
        tasks = set(data.get("results", {}))
        new = tasks - seen_tasks
        if not new:
            continue
        run.files.append(file)
        for task in new:
            b = by_task.get(task)
            value = data["results"][task].get(b.metric) if b else None
            if b and isinstance(value, (int, float)):
                run.scores[b.label] = float(value) * b.scale
        record = file.with_name(file.name.replace("_results.json", "_dymu_tokens.json"))
        if record.is_file():
            for task, entry in json.loads(record.read_text()).get("tasks", {}).items():
                if task in new:
                    for s in entry.get("samples", []):
                        samples[(task, str(s["split"]), str(s["doc_id"]))] = s["visual_tokens"]
        else:
            t = data.get("throughput", {})
            if t.get("avg_dymu_images"):
                summaries.append(
                    {"images": int(t["avg_dymu_images"]), "mean": t["avg_dymu_visual_tokens_mean"],
                     "std": t["avg_dymu_visual_tokens_std"], "min": None, "max": None}
                )
        seen_tasks |= tasks
    parts = summaries + ([token_stats(c for cs in samples.values() for c in cs)] if samples else [])
    run.tokens = parts[0] if len(parts) == 1 else pooled_stats(parts)
    return run


def relative_average(run: Run, full: Run | None) -> tuple[float | None, int]:
    """Mean over the benchmarks both runs have of 100 · score / full score, and how many benchmarks that is."""
    if full is None:
        return None, 0
    common = [k for k in run.scores if k in full.scores and full.scores[k]]
    if not common:
        return None, 0
    return sum(100.0 * run.scores[k] / full.scores[k] for k in common) / len(common), len(common)


def _tokens_text(tokens: dict[str, Any]) -> str:
    if not tokens.get("images"):
        return "–"
    return f"{tokens['mean']:.0f} ± {tokens['std']:.0f}"


def build_table(runs: Sequence[Run], benchmarks: Sequence[Benchmark], full_label: str | None = "full") -> tuple[str, str]:
    """(markdown, csv) of the runs, with only the benchmark columns some run has."""
    columns = [b for b in benchmarks if any(b.label in r.scores for r in runs)]
    full = next((r for r in runs if r.label == full_label), None)
    head = ["Setting", "Visual tokens", *[b.label for b in columns], "Avg (% of full)"]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) + 1)) + "|"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["setting", "tokens_mean", "tokens_std", "images", *[b.label for b in columns], "avg_pct_of_full", "avg_benchmarks"])
    for r in runs:
        avg, n = relative_average(r, full)
        cells = [f"{r.scores[b.label]:.{b.decimals}f}" if b.label in r.scores else "–" for b in columns]
        md.append("| " + " | ".join([r.label, _tokens_text(r.tokens), *cells, f"{avg:.1f}" if avg is not None else "–"]) + " |")
        t = r.tokens
        writer.writerow(
            [r.label, _num(t.get("mean")), _num(t.get("std")), t.get("images", 0),
             *[_num(r.scores.get(b.label)) for b in columns], _num(avg), n]
        )
    return "\n".join(md) + "\n", out.getvalue()


def paper_rows(benchmarks: Sequence[Benchmark]) -> str:
    """The DyMU paper's LLaVA-1.5-7B rows as markdown, same columns as :data:`BENCHMARKS`."""
    head = ["Setting (paper)", "Visual tokens", *[b.label for b in benchmarks], "Avg (% of full)"]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(benchmarks) + 1)) + "|"]
    for name, row in PAPER_LLAVA15_7B.items():
        cells = [f"{row['scores'][b.label]:.{b.decimals}f}" if b.label in row["scores"] else "–" for b in benchmarks]
        md.append("| " + " | ".join([name, row["tokens"], *cells, f"{row['avg']:.1f}"]) + " |")
    return "\n".join(md) + "\n"


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def parse_benchmark(text: str) -> Benchmark:
    """``LABEL=TASK:METRIC[:SCALE]``, e.g. ``POPE=pope:pope_accuracy,none:100``."""
    label, _, rest = text.partition("=")
    parts = rest.split(":")
    if not label or len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(f"--benchmark {text!r}: expected LABEL=TASK:METRIC[:SCALE], e.g. POPE=pope:pope_accuracy,none:100")
    return Benchmark(label, parts[0], parts[1], float(parts[2]) if len(parts) == 3 else 1.0)


def discover_runs(root: Path) -> list[tuple[str, Path]]:
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and any(d.rglob("*_results.json"))]
    if not subdirs:
        raise FileNotFoundError(f"no setting folders with lmms-eval *_results.json under {root}")
    rank = {name: i for i, name in enumerate(SETTING_ORDER)}
    subdirs.sort(key=lambda d: (rank.get(d.name, len(rank)), d.name))
    return [(d.name, d) for d in subdirs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_table.py",
        description="Turn lmms-eval result folders (one per setting) into the DyMU paper's table (markdown + CSV).",
        epilog="Example: python eval_scripts/make_table.py logs/llava15 --output logs/llava15/table --paper",
    )
    parser.add_argument("root", nargs="?", help="folder with one subfolder per setting (full, low, mid, high, ...)")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=PATH", help="a setting and its results folder or file; repeatable, in table order")
    parser.add_argument("--full", default="full", help="label of the full model's row, the 100%% reference (default: full)")
    parser.add_argument("--benchmark", action="append", default=[], metavar="LABEL=TASK:METRIC[:SCALE]",
                        help="add a column or replace one by label (e.g. POPE=pope:pope_accuracy,none:100)")
    parser.add_argument("--output", help="write OUTPUT.md and OUTPUT.csv")
    parser.add_argument("--paper", action="store_true", help="also print the paper's LLaVA-1.5-7B rows")
    args = parser.parse_args(argv)
    try:
        benchmarks = list(BENCHMARKS)
        for text in args.benchmark:
            b = parse_benchmark(text)
            labels = [x.label for x in benchmarks]
            if b.label in labels:
                benchmarks[labels.index(b.label)] = b
            else:
                benchmarks.append(b)
        pairs = []
        for text in args.run:
            label, sep, path = text.partition("=")
            if not sep or not label or not path:
                raise ValueError(f"--run {text!r}: expected LABEL=PATH")
            pairs.append((label, Path(path)))
        if args.root:
            pairs += discover_runs(Path(args.root))
        if not pairs:
            raise ValueError("give a results root folder or --run LABEL=PATH")
        runs = [load_run(label, path, benchmarks) for label, path in pairs]
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as err:
        print(f"make_table: error: {err}", file=sys.stderr)
        return 2
    md, table_csv = build_table(runs, benchmarks, args.full)
    print(md, end="")
    if args.paper:
        print("\n" + paper_rows(BENCHMARKS), end="")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output + ".md").write_text(md)
        Path(args.output + ".csv").write_text(table_csv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
