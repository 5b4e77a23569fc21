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
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from dymu.small_vlm import THRESHOLD_DIR

# the subset rule and the answer normalisation: one definition, shared with the lmms-eval task easy_vqa
from dymu.lmms_eval.tasks.easy_vqa.utils import balanced_subset, normalise

REPO = Path(__file__).resolve().parents[1]
SETS = {28: "low", 88: "mid", 176: "high"}  # DyMU-low/mid/high: 11 %, 34 %, 69 % of 256 (the paper's 64/195/394 of 576)


def thresholds_path(k: int, raster: bool = False) -> Path:
    return THRESHOLD_DIR / f"dinov2-small-224-tome-{k}out{'-raster' if raster else ''}.safetensors"


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _inputs(processor, rows: list[dict]):
    from PIL import Image

    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
        add_generation_prompt=True) for r in rows]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


# ---------------------------------------------------------------------------------------------------------------
# Rows: each a method of dymu.baselines (or DyMU, or the stock model) set up through dymu.vlm.enable_dymu


class Row:
    """One table row: how to set the model up and how to build its inputs."""

    def __init__(self, label: str, means: dict[int, float]) -> None:
        self.label = label
        self.kind, self.k, self.vtu, self.raster, self.count = "full", None, None, False, 256
        if label == "full":
            return
        m = re.fullmatch(r"dymu-(\d+)(-raster)?-(fast|exact|off)", label)
        if m:
            self.kind, self.k, self.raster, self.vtu = "dymu", int(m[1]), bool(m[2]), m[3]
            if not thresholds_path(self.k, self.raster).exists():
                raise SystemExit(f"{label}: no thresholds {thresholds_path(self.k, self.raster)}")
            return
        m = re.fullmatch(r"(tome|prune|random)@(\d+)(?:-(fast|exact|off))?", label)
        if not m or (m[1] == "tome") != (m[3] is not None):
            raise SystemExit(f"unknown row {label!r}: expected full, dymu-<K>[-raster]-<vtu>, tome@<K>-<vtu>, "
                             "prune@<K>, random@<K>")
        self.kind, self.k, self.vtu = m[1], int(m[2]), m[3]
        if self.k not in means:
            raise SystemExit(f"{label} needs DyMU-{self.k}'s mean token count: run dymu-{self.k}-fast first")
        self.count = round(means[self.k])

    def enable(self, model) -> None:
        from dymu.vlm import enable_dymu

        if self.kind == "dymu":
            enable_dymu(model, thresholds_path(self.k, self.raster), vtu=self.vtu,
                        token_order="raster" if self.raster else "single")
        elif self.kind != "full":
            enable_dymu(model, None, vtu=self.vtu, method=self.kind, token_budget=self.count)

    def disable(self, model) -> None:
        from dymu.vlm import disable_dymu

        disable_dymu(model)

    def inputs(self, processor, rows: list[dict]) -> dict:
        inputs = dict(_inputs(processor, rows))
        if self.kind == "random":  # seeded per question: the same subset whatever the batch
            inputs["selection_seeds"] = [r["index"] for r in rows]
        return inputs

    def info(self) -> dict:
        out = {"kind": self.kind, "vtu": self.vtu}
        if self.kind == "dymu":
            out["thresholds"] = str(thresholds_path(self.k, self.raster).relative_to(REPO))
            out["token_order"] = "raster" if self.raster else "single"
        elif self.kind != "full":
            out["matched_to"] = f"dymu-{self.k}-fast"
            out["tokens_per_image"] = self.count
        return out


@torch.no_grad()
def answer_batch(model, processor, rows: list[dict], max_new_tokens: int = 6, row: Row | None = None
                 ) -> tuple[list[str], list[int]]:
    """Greedy answers and visual tokens per question (as the call reports them; 256 for the stock model)."""
    from dymu.vlm import generate_with_counts

    inputs = (row or Row("full", {})).inputs(processor, rows)
    out, tokens = generate_with_counts(model, inputs, max_new_tokens=max_new_tokens, do_sample=False)
    decoded = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [d.strip() for d in decoded], list(tokens.counts)


@torch.no_grad()
def prefill_ratio(model, processor, rows: list[dict], row: Row, reps: int) -> dict:
    """Median seconds of one forward (encoder + prefill, last logits only) of ``rows``, full and ``row``
    alternately; the ratio full / row."""
    full = Row("full", {})
    times: dict[str, list[float]] = {"full": [], "row": []}
    for _ in range(reps):
        for name, r in (("full", full), ("row", row)):
            r.enable(model)
            try:
                inputs = r.inputs(processor, rows)
                start = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                times[name].append(time.perf_counter() - start)
            finally:
                r.disable(model)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"prefill_s_full": round(med["full"], 4), "prefill_s": round(med["row"], 4),
            "prefill_ratio": round(med["full"] / med["row"], 3)}


def evaluate(model, processor, rows: list[dict], batch: int, label: str, deadline: float | None = None,
             row: Row | None = None) -> dict:
    from tqdm import tqdm

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
    return {
        "row": label, "n": n, "correct": k, "accuracy": k / max(1, n), "wilson95": [lo, hi],
        "visual_tokens_mean": float(t.mean()), "visual_tokens_std": float(t.std()) if n > 1 else 0.0,
        "seconds": round(time.perf_counter() - start, 1), "complete": n == len(rows),
        "per_class": per_class,
        "predictions": [{"index": r["index"], "pred": p, "answer": r["answer"]} for p, r in zip(preds, rows)],
    }


def load_model(checkpoint: str | None, via_load_llava: bool):
    """The trained model: built with :func:`dymu.small_vlm.build_small_vlm`, saved with ``save_pretrained`` and
    reloaded through ``dymu.vlm.load_llava`` (``via_load_llava``), or used as built."""
    from dymu.small_vlm import build_small_vlm

    model, processor = build_small_vlm(checkpoint or "default")
    if via_load_llava:
        from dymu.vlm import load_llava

        tmp = tempfile.mkdtemp(prefix="small_vlm_")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        del model
        model, processor = load_llava(tmp)
    return model.eval(), processor


# ---------------------------------------------------------------------------------------------------------------
# Table, CSV, plot


def row_name(label: str) -> str:
    m = re.fullmatch(r"dymu-(\d+)(-raster)?-(\w+)", label)
    if m:
        return f"DyMU-{SETS.get(int(m[1]), m[1])} ({m[1]}out{', raster' if m[2] else ''}), VTU {m[3]}"
    m = re.fullmatch(r"(tome|prune|random)@(\d+)(?:-(\w+))?", label)
    if m:
        what = {"tome": "ToMe fixed r", "prune": "CLS-attention pruning", "random": "random drop"}[m[1]]
        return f"{what} @ DyMU-{SETS.get(int(m[2]), m[2])}" + (f", VTU {m[3]}" if m[3] else "")
    return "full tokens" if label == "full" else label


def write_csv(results: dict, path: Path) -> None:
    import csv

    full = next((r for r in results["rows"] if r["row"] == "full"), None)
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


CLASSES = ("yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "teal", "brown", "yellow", "gray",
           "black")


def markdown_tables(results: dict) -> str:
    """The main table (one line per row) and the per-class table, as markdown."""
    full = next((r for r in results["rows"] if r["row"] == "full"), None)
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


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

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
    ax.set_ylabel("easy-VQA accuracy (%), 95 % Wilson interval")
    ax.set_title(f"Small real VLM (DINOv2-S + SmolLM2-135M), n = {results['subset']['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    ap.add_argument("--csv", default=None, help="also write the table as CSV here")
    ap.add_argument("--plot", default=None, help="also write accuracy vs visual tokens as a PNG here")
    ap.add_argument("--markdown", default=None, help="also write the markdown tables here")
    ap.add_argument("--no-load-llava", action="store_true", help="use the built model directly")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = None
    if args.deadline:
        import datetime as dt

        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if when <= now:  # a time already past today means tomorrow's
            when += dt.timedelta(days=1)
        deadline = when.timestamp()

    out = Path(args.out)
    rows = balanced_subset(args.per_class, args.seed)
    results = {"subset": {"rule": f"easy-VQA test questions shuffled with random.Random({args.seed}); per answer "
                          f"class the first {args.per_class}", "n": len(rows),
                          "indices": [r["index"] for r in rows]},
               "threads": torch.get_num_threads(), "rows": []}
    if (args.append or args.time_only or not args.rows) and out.exists():
        results = json.loads(out.read_text())
    labels = [x for x in args.rows.split(",") if x]
    if labels:
        model, processor = load_model(args.checkpoint, not args.no_load_llava)
    for label in labels:
        means = {int(m[1]): r["visual_tokens_mean"] for r in results["rows"]
                 if (m := re.fullmatch(r"dymu-(\d+)-fast", r["row"])) and r["complete"]}
        row = Row(label, means)
        if args.time_only:
            done = next((r for r in results["rows"] if r["row"] == label), None)
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
            res = evaluate(model, processor, rows, args.batch, label, deadline, row=row)
        finally:
            row.disable(model)
        if res["n"] == 0:  # stopped by the deadline before its first batch: nothing to keep
            print(f"{label}: stopped by --deadline before any question; not written", flush=True)
            continue
        res.update(row.info())
        if args.time_reps:
            res.update(prefill_ratio(model, processor, rows[: args.batch], row, args.time_reps))
        full = next((r for r in results["rows"] if r["row"] == "full"), None)
        if full is not None and label != "full":
            same = sum(normalise(a["pred"]) == normalise(b["pred"])
                       for a, b in zip(res["predictions"], full["predictions"]))
            res["same_answer_as_full"] = same
        results["rows"] = [r for r in results["rows"] if r["row"] != label] + [res]
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
