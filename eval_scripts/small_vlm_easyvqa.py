r"""easy-VQA accuracy of the small real VLM (DINOv2-S + mlp2x_gelu + SmolLM2-135M): full tokens, DyMU and baselines.

Subset rule (fixed, class-balanced): all easy-VQA **test** questions, indices 0…9672 in the package's order,
shuffled with ``random.Random(0)``; per answer class (13 classes) the first ``--per-class`` questions in that
order are kept; the kept questions are evaluated in the shuffled order. ``--per-class 20`` → 260 questions.

Each question is one single-turn chat (the processor's chat template, image first), greedy decoding, at most 6 new
tokens. Accuracy = exact match of the normalised answer (lowercase, punctuation stripped, whitespace collapsed)
with the one-word ground truth; 95 % Wilson interval. Rows (``--rows``, comma-separated):

* ``full`` — the stock ``LlavaForConditionalGeneration``, 256 visual tokens per image;
* ``dymu-<K>[-raster]-<vtu>`` — DyMU (``dymu.vlm.enable_dymu``) with the thresholds
  ``checkpoints/small_vlm/thresholds/dinov2-small-224-tome-<K>out[-raster].safetensors`` (found on easy-VQA train
  images 2000–2511, authors' or raster token order), VTU ``fast``/``exact``/``off``; the authors' order runs its
  per-image path (``token_order="single"``, what their code does at batch size 1);
Every row but ``full`` is a ``method`` of ``dymu.vlm.enable_dymu`` (:mod:`dymu.baselines`):

* ``tome@<K>-<vtu>`` — fixed-count ToMe (``method="tome"``): every image merges the same number of
  tokens per layer (constant schedule), so that it keeps DyMU-K's mean count (from this run's ``dymu-<K>-fast``
  row, or the ``--out`` file's);
* ``prune@<K>`` — (``method="prune"``) keep the patches the CLS token attends to most in the feature layer's block (heads averaged;
  VisionZip's dominant tokens), same count, kept in raster order at consecutive positions;
* ``random@<K>`` — (``method="random"``) keep a random subset of that size (seeded per question by its index,
  ``selection_seeds``), the floor.

Every row also gets a prefill-time ratio: one forward (vision encoder + LLM prefill) of the first ``--batch``
questions, timed alternately with the full model (median of ``--time-reps``), ``full time / row time``.
Results are written after every row (``--out``), so a stopped run keeps the rows done; ``--csv`` and ``--plot``
write the table and the accuracy-vs-tokens plot from the JSON (``--rows ''`` only re-renders).

Example:
  python eval_scripts/small_vlm_easyvqa.py --per-class 20 --threads 2 \
      --rows full,dymu-28-fast,dymu-88-fast,dymu-176-fast,tome@88-fast,prune@88,random@88 \
      --out docs/small_vlm_easyvqa.json --csv docs/small_vlm_easyvqa.csv --plot docs/small_vlm_easyvqa.png \
      --markdown docs/small_vlm_easyvqa.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dymu.evaluation.easy_vqa_report import add_output_arguments, find_row, markdown_tables, write_csv, write_plot
from dymu.evaluation.easy_vqa_rows import (
    Row,
    dymu_means,
    evaluate_row,
    load_model,
    new_results,
    prefill_ratio,
    put_row,
    utc_deadline,
)

# the subset rule: one definition, shared with the lmms-eval task easy_vqa
from dymu.lmms_eval.tasks.easy_vqa.utils import balanced_subset

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="projector safetensors (default: the committed one)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="full,dymu-28-fast,dymu-88-fast,dymu-176-fast")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--time-reps", type=int, default=3, help="prefill timings per row (0: no timing)")
    ap.add_argument("--deadline", default=None, help="UTC HH:MM after which no new batch starts")
    ap.add_argument("--out", default=str(REPO / "docs" / "small_vlm_easyvqa.json"))
    ap.add_argument("--append", action="store_true", help="keep the --out file's other rows (replace same labels)")
    ap.add_argument("--time-only", action="store_true",
                    help="only (re)measure the prefill ratios of --rows already in --out (e.g. on a quiet machine)")
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = utc_deadline(args.deadline) if args.deadline else None
    out = Path(args.out)
    rows = balanced_subset(args.per_class, args.seed)
    results = new_results(rows, args.per_class, args.seed)
    if (args.append or args.time_only or not args.rows) and out.exists():
        results = json.loads(out.read_text())
    labels = [x for x in args.rows.split(",") if x]
    if labels:
        model, processor = load_model(args.checkpoint, not args.no_load_llava)
    for label in labels:
        try:
            row = Row(label, dymu_means(results))
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if args.time_only:
            done = find_row(results, label)
            if done is None:
                raise SystemExit(f"--time-only: {label} is not in {out}; evaluate it first")
            done.update(prefill_ratio(model, processor, rows[: args.batch], row, args.time_reps or 3))
            done["prefill_threads"] = torch.get_num_threads()
            print(f"{label}: prefill x{done['prefill_ratio']:.2f} ({done['prefill_s']:.3f} s vs full "
                  f"{done['prefill_s_full']:.3f} s)", flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            continue
        row.enable(model)
        try:
            res = evaluate_row(model, processor, rows, args.batch, label, deadline, row=row)
        finally:
            row.disable(model)
        if res["n"] == 0:  # stopped by the deadline before its first batch: nothing to keep
            print(f"{label}: stopped by --deadline before any question; not written", flush=True)
            continue
        res.update(row.info(REPO))
        if args.time_reps:
            res.update(prefill_ratio(model, processor, rows[: args.batch], row, args.time_reps))
        put_row(results, res)
        print(f"{label}: {res['correct']}/{res['n']} = {100 * res['accuracy']:.1f}% "
              f"[{100 * res['wilson95'][0]:.1f}, {100 * res['wilson95'][1]:.1f}], visual tokens "
              f"{res['visual_tokens_mean']:.1f} ± {res['visual_tokens_std']:.1f}, {res['seconds']} s, "
              f"prefill x{res.get('prefill_ratio', float('nan')):.2f}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    if args.csv:
        write_csv(results, Path(args.csv))
    if args.plot:
        write_plot(results, Path(args.plot))
    if args.markdown:
        Path(args.markdown).write_text(markdown_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
