r"""Complexity-VQA table of the small VLM trained on the mix (issue 31): full tokens, DyMU and the fixed-count
baselines at the three mean budgets, overall and per complexity level.

Test set: ``dymu.complexity_vqa.generate(--seed, --count)``, the first (balanced) question of each image; 1,040
images = 20 blocks of 52 (each level x answer once per block). Each question is one single-turn chat (image first,
the bare question), greedy, at most 6 new tokens, exact match after normalisation; 95 % Wilson intervals.
Rows (``--rows``, the labels of ``eval_scripts/small_vlm_easyvqa.py``; DyMU rows use the mix model's threshold
sets ``mix-<K>out``, ``dymu.small_vlm.threshold_path``):

* ``full`` — 256 visual tokens per image;
* ``dymu-<K>-fast`` — DyMU with the mix thresholds ``<K>out`` (K = 28/88/176: low/mid/high), VTU fast;
* ``tome@<K>-fast``, ``prune@<K>``, ``random@<K>`` — fixed-count ToMe (+ VTU fast), CLS-attention pruning and
  random drop (``dymu.baselines``), each keeping DyMU-K's mean count on this set (its row must come first).

Per row: accuracy overall and per level, visual tokens per level, every answer (right or wrong, its level and
tokens), so McNemar DyMU vs ToMe at each budget is computed per level too. The results file (``--out``) is
written after every row, and a rerun skips the rows it holds complete (``--redo`` reruns them); ``--rows ''``
only re-renders ``--markdown``, ``--csv``, ``--plot`` and ``--tokens-plot`` from it.

Example (once the mix checkpoint exists):
  python eval_scripts/complexity_vqa_table.py --seed 1 --count 1040 --threads 2 \
      --out docs/complexity_vqa.json --markdown docs/complexity_vqa.md --csv docs/complexity_vqa.csv \
      --plot docs/complexity_vqa.png --tokens-plot docs/complexity_vqa_tokens.png
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from dymu.evaluation.complexity_report import markdown_tables, write_csv, write_plots
from dymu.evaluation.complexity_rows import DEFAULT_ROWS, check_same_set, new_results, question_rows, run_rows
from dymu.evaluation.easy_vqa_rows import load_model, utc_deadline
from dymu.evaluation.easy_vqa_report import add_output_arguments

REPO = Path(__file__).resolve().parents[1]
MIX_PROJECTOR = REPO / "checkpoints" / "small_vlm_mix" / "projector.safetensors"


def shown(path: str | Path) -> str:
    """A path as the recorded command shows it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projector", default=str(MIX_PROJECTOR), help="the mix model's projector safetensors")
    ap.add_argument("--seed", type=int, default=1, help="the test set's seed (training used 1000)")
    ap.add_argument("--count", type=int, default=1040, help="images, one question each (52 = one balanced block)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--sets", default="mix-", help="threshold name prefix: 'mix-' (the mix model's), '' (easy-VQA's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--deadline", default=None, help="UTC HH:MM after which no new batch starts")
    ap.add_argument("--out", default=str(REPO / "docs" / "complexity_vqa.json"))
    ap.add_argument("--redo", action="store_true", help="rerun --rows the results file already holds complete")
    add_output_arguments(ap)
    ap.add_argument("--tokens-plot", default=None, help="also write DyMU's tokens vs complexity level as a PNG here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    labels = [x for x in args.rows.split(",") if x]
    results = json.loads(out.read_text()) if out.exists() else None
    if labels:
        rows = question_rows(args.seed, args.count)
        if results is None:
            results = new_results(rows, args.seed, args.count, shown(args.projector))
        try:
            check_same_set(results, args.seed, args.count)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if args.redo:
            results["rows"] = [r for r in results["rows"] if r["row"] not in labels]
        model, processor = load_model(args.projector, not args.no_load_llava)

        def command(label: str) -> str:
            parts = ["python", "eval_scripts/complexity_vqa_table.py", "--projector", shown(args.projector),
                     "--seed", str(args.seed), "--count", str(args.count), "--sets", args.sets, "--rows", label,
                     "--batch", str(args.batch), "--out", shown(out)]
            return shlex.join(parts)

        deadline = utc_deadline(args.deadline) if args.deadline else None
        try:
            done = run_rows(model, processor, rows, labels, results, out, batch=args.batch, sets=args.sets,
                            deadline=deadline, command=command, root=REPO)
        except ValueError as err:  # a bad label, or a baseline before its DyMU row
            raise SystemExit(str(err)) from None
        for r in results["rows"]:
            if r["row"] in done:
                print(f"{r['row']}: {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f}%, visual tokens "
                      f"{r['visual_tokens_mean']:.1f}, {r['seconds']} s", flush=True)
    if results is None:
        raise SystemExit(f"no results file {out} to render")
    if args.csv:
        write_csv(results, Path(args.csv))
    if args.markdown:
        Path(args.markdown).write_text(markdown_tables(results))
    write_plots(results, Path(args.plot) if args.plot else None, Path(args.tokens_plot) if args.tokens_plot else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
