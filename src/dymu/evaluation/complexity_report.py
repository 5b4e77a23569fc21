"""The complexity-VQA table as CSV, markdown and two plots, from its results file (the JSON that
:mod:`dymu.evaluation.complexity_rows` fills): accuracy overall and per complexity level with Wilson intervals, the
visual tokens each row spends per level, McNemar DyMU vs ToMe at each budget, and every row's command. Row names
and the accuracy-vs-tokens plot are the easy-VQA table's (:mod:`dymu.evaluation.easy_vqa_report`)."""

from __future__ import annotations

import csv
from pathlib import Path

from dymu.evaluation.complexity_rows import paired_tests
from dymu.evaluation.easy_vqa_report import find_row, row_name, write_plot
from dymu.evaluation.stats import grouped_accuracy


def levels_of(results: dict) -> list[str]:
    """The complexity levels of the question set, as the results file keys them ("0", "1", ...)."""
    return sorted(results["subset"]["per_level"], key=int)


def overall(entry: dict) -> dict:
    """A row's accuracy and visual tokens over all its answered questions, as :func:`grouped_accuracy` gives them
    per level (population std, the same as the per-level figures)."""
    preds = entry["predictions"]
    return grouped_accuracy([p["correct"] for p in preds], [p["tokens"] for p in preds], ["all"] * len(preds))["all"]


def _cell(stats: dict) -> str:
    lo, hi = stats["wilson95"]
    return f"{100 * stats['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_csv(results: dict, path: Path) -> None:
    """One line per row and level ("all" first): questions, correct, accuracy, Wilson 95 %, % of full, tokens."""
    full = find_row(results, "full")
    full_acc = {"all": overall(full)["accuracy"], **{k: v["accuracy"] for k, v in full["per_level"].items()}} \
        if full else {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "name", "level", "n", "correct", "accuracy", "wilson95_low", "wilson95_high",
                    "pct_of_full", "visual_tokens_mean", "visual_tokens_std"])
        for r in results["rows"]:
            for level, s in [("all", overall(r)), *r["per_level"].items()]:
                pct = round(100 * s["accuracy"] / full_acc[level], 1) if full_acc.get(level) else ""
                w.writerow([r["row"], row_name(r["row"]), level, s["n"], s["correct"], round(s["accuracy"], 4),
                            round(s["wilson95"][0], 4), round(s["wilson95"][1], 4), pct,
                            round(s["tokens_mean"], 1), round(s["tokens_std"], 1)])


def markdown_tables(results: dict) -> str:
    """Accuracy (overall and per level), tokens per level, McNemar DyMU vs ToMe, and the command of every row."""
    levels = levels_of(results)
    full = find_row(results, "full")
    full_acc = overall(full)["accuracy"] if full else 0.0
    head = " | ".join(f"level {lv} (n = {results['subset']['per_level'][lv]})" for lv in levels)
    lines = [f"| row | `--rows` label | visual tokens / image | all: accuracy % [95 % Wilson] | % of full | {head} |",
             "|---|---|---|---|---|" + "---|" * len(levels)]
    for r in results["rows"]:
        s = overall(r)
        pct = f"{100 * s['accuracy'] / full_acc:.1f}" if full_acc else "—"
        per = " | ".join(_cell(r["per_level"][lv]) if lv in r["per_level"] else "—" for lv in levels)
        lines.append(f"| {row_name(r['row'])} | `{r['row']}` | {s['tokens_mean']:.1f} ± {s['tokens_std']:.1f} | "
                     f"{s['correct']}/{s['n']} = **{_cell(s)}** | {pct} | {per} |")
    lines += ["", "Visual tokens per image by level (mean ± std):", "",
              "| `--rows` label | " + " | ".join(f"level {lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
    for r in results["rows"]:
        per = r["per_level"]
        lines.append(f"| `{r['row']}` | " + " | ".join(
            f"{per[lv]['tokens_mean']:.1f} ± {per[lv]['tokens_std']:.1f}" if lv in per else "—" for lv in levels) + " |")
    lines += ["", "McNemar, DyMU vs fixed-count ToMe at DyMU's mean (exact two-sided binomial test on the discordant "
              "pairs; b: DyMU right and ToMe wrong, c: the reverse):", "",
              "| budget | level | questions | DyMU right | ToMe right | b | c | p |", "|---|---|---|---|---|---|---|---|"]
    for t in paired_tests(results):
        lines.append(f"| `{t['dymu']}` vs `{t['tome']}` | {t['level']} | {t['questions']} | {t['dymu_correct']} | "
                     f"{t['tome_correct']} | {t['b']} | {t['c']} | {t['p']:.3g} |")
    lines += ["", "Commands:", ""]
    lines += [f"* `{r['row']}`: `{r.get('command', '—')}`" for r in results["rows"]]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, accuracy_png: Path | None, tokens_png: Path | None) -> None:
    """Accuracy vs mean visual tokens per method (the easy-VQA plot's style), and tokens vs complexity level:
    DyMU's per-level mean ± std against the fixed counts of the baselines at each budget."""
    n = results["subset"]["n"]
    title = f"Complexity-VQA, small VLM (mix), n = {n}"
    if accuracy_png:
        write_plot(results, accuracy_png, task="complexity-VQA", title=title)
    if not tokens_png:
        return
    import matplotlib  # optional: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = levels_of(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = iter(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"))
    for r in results["rows"]:
        if r.get("kind") != "dymu":
            continue
        colour = next(colours, "k")
        per = r["per_level"]
        ax.errorbar([int(lv) for lv in levels], [per[lv]["tokens_mean"] for lv in levels],
                    yerr=[per[lv]["tokens_std"] for lv in levels], color=colour, marker="o", capsize=3,
                    label=row_name(r["row"]))
        fixed = find_row(results, f"tome@{r['row'].split('-')[1]}-fast")
        if fixed is not None:
            ax.axhline(fixed["tokens_per_image"], color=colour, ls="--", lw=1,
                       label=f"fixed-count baselines @ {fixed['tokens_per_image']}")
    ax.set_xticks([int(lv) for lv in levels])
    ax.set_xlabel("complexity level (0: 1 object, 1: 2-4, 2: 5-9, 3: 10-16)")
    ax.set_ylabel("visual tokens per image (mean ± std)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(tokens_png, dpi=120)
