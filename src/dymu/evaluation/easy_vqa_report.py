"""The small VLM's easy-VQA table as CSV, markdown and an accuracy-vs-tokens plot, from its results file (the
JSON that :mod:`dymu.evaluation.easy_vqa_rows` fills; ``eval_scripts/small_vlm_easyvqa.py`` writes both)."""

from __future__ import annotations

import argparse

import csv
import re
from pathlib import Path

SETS = {28: "low", 88: "mid", 176: "high"}  # DyMU-low/mid/high: 11 %, 34 %, 69 % of 256 (the paper's 64/195/394 of 576)
CLASSES = ("yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "teal", "brown", "yellow", "gray",
           "black")


def row_name(label: str) -> str:
    """The row's name in the table ("DyMU-mid (88out), VTU fast") from its ``--rows`` label."""
    m = re.fullmatch(r"dymu-(\d+)(-raster)?-(\w+)", label)
    if m:
        return f"DyMU-{SETS.get(int(m[1]), m[1])} ({m[1]}out{', raster' if m[2] else ''}), VTU {m[3]}"
    m = re.fullmatch(r"(tome|prune|random)@(\d+)(?:-(\w+))?", label)
    if m:
        what = {"tome": "ToMe fixed r", "prune": "CLS-attention pruning", "random": "random drop"}[m[1]]
        return f"{what} @ DyMU-{SETS.get(int(m[2]), m[2])}" + (f", VTU {m[3]}" if m[3] else "")
    return "full tokens" if label == "full" else label


def find_row(results: dict, label: str) -> dict | None:
    """The results file's entry for the row ``label`` (None when it has none)."""
    return next((r for r in results["rows"] if r["row"] == label), None)


def write_csv(results: dict, path: Path) -> None:
    full = find_row(results, "full")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "name", "n", "correct", "accuracy", "wilson95_low", "wilson95_high", "pct_of_full",
                    "visual_tokens_mean", "visual_tokens_std", "prefill_ratio", "same_answer_as_full"])
        for r in results["rows"]:
            pct = 100 * r["accuracy"] / full["accuracy"] if full and full["accuracy"] else ""
            w.writerow([r["row"], row_name(r["row"]), r["n"], r["correct"], round(r["accuracy"], 4),
                        round(r["wilson95"][0], 4), round(r["wilson95"][1], 4), round(pct, 1) if pct != "" else "",
                        round(r["visual_tokens_mean"], 1), round(r["visual_tokens_std"], 1),
                        r.get("prefill_ratio", ""), r.get("same_answer_as_full", "")])


def markdown_tables(results: dict) -> str:
    """The main table (one line per row) and the per-class table, as markdown."""
    full = find_row(results, "full")
    lines = ["| row | `--rows` label | visual tokens / image (mean ± std) | accuracy | 95 % Wilson | % of full | "
             "same answer as full | prefill speed-up vs full |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        pct = f"{100 * r['accuracy'] / full['accuracy']:.1f}" if full and full["accuracy"] else "—"
        same = f"{r['same_answer_as_full']}/{r['n']}" if "same_answer_as_full" in r else "—"
        ratio = f"{r['prefill_ratio']:.2f}×" if "prefill_ratio" in r and r["row"] != "full" else "1 (ref.)"
        lines.append(
            f"| {row_name(r['row'])} | `{r['row']}` | {r['visual_tokens_mean']:.1f} ± {r['visual_tokens_std']:.1f} | "
            f"{r['correct']}/{r['n']} = **{100 * r['accuracy']:.1f} %** | [{100 * r['wilson95'][0]:.1f}, "
            f"{100 * r['wilson95'][1]:.1f}] | {pct} | {same} | {ratio} |")
    lines += ["", "| `--rows` label | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    for r in results["rows"]:
        per = r["per_class"]
        lines.append(f"| `{r['row']}` | " + " | ".join(str(per.get(c, [0, 0])[0]) for c in CLASSES) + " |")
    return "\n".join(lines) + "\n"


def write_plot(results: dict, path: Path, task: str = "easy-VQA", title: str | None = None) -> None:
    """Accuracy on ``task`` (95 % Wilson interval) against mean visual tokens per image, one marker style per
    method; ``title`` defaults to the small VLM and the question count."""
    import matplotlib  # optional: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"full": ("k", "*"), "dymu": ("tab:blue", "o"), "tome": ("tab:orange", "s"),
              "prune": ("tab:green", "^"), "random": ("tab:gray", "v")}
    seen = set()
    for r in results["rows"]:
        kind = r.get("kind", "full" if r["row"] == "full" else "dymu")
        colour, marker = styles.get(kind, ("tab:red", "x"))
        if kind == "dymu" and r.get("vtu") != "fast":
            marker = {"exact": "D", "off": "x"}.get(r.get("vtu"), marker)
        if kind == "dymu" and r.get("token_order") == "raster":
            colour = "tab:purple"
        label = {"full": "full tokens", "dymu": "DyMU", "tome": "ToMe (fixed r)", "prune": "CLS-attention pruning",
                 "random": "random drop"}[kind] if kind in styles else kind
        if kind == "dymu" and r.get("token_order") == "raster":
            label = "DyMU, raster order"
        key = (label, marker, colour)
        lo, hi = r["wilson95"]
        ax.errorbar(r["visual_tokens_mean"], 100 * r["accuracy"],
                    yerr=[[100 * (r["accuracy"] - lo)], [100 * (hi - r["accuracy"])]], fmt=marker, color=colour,
                    capsize=3, label=None if key in seen else f"{label}"
                    + (f" (VTU {r.get('vtu')})" if kind in ("dymu", "tome") else ""))
        seen.add(key)
    ax.set_xlabel("visual tokens per image (mean)")
    ax.set_ylabel(f"{task} accuracy (%), 95 % Wilson interval")
    ax.set_title(title or f"Small real VLM (DINOv2-S + SmolLM2-135M), n = {results['subset']['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_output_arguments(ap: argparse.ArgumentParser) -> None:
    """The outputs every results-table script offers (CSV, markdown, accuracy plot) and its model-loading switch."""
    ap.add_argument("--csv", default=None, help="also write the table as CSV here")
    ap.add_argument("--markdown", default=None, help="also write the markdown tables here")
    ap.add_argument("--plot", default=None, help="also write accuracy vs visual tokens as a PNG here")
    ap.add_argument("--no-load-llava", action="store_true", help="use the built model directly")
