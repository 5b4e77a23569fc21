"""easy-VQA accuracy of the small real VLM (DINOv2-S + mlp2x_gelu + SmolLM2-135M), full tokens and DyMU.

Subset rule (fixed, class-balanced): all easy-VQA **test** questions, indices 0…9672 in the package's order,
shuffled with ``random.Random(0)``; per answer class (13 classes) the first ``--per-class`` questions in that
order are kept; the kept questions are evaluated in the shuffled order. ``--per-class 20`` → 260 questions.

Each question is one single-turn chat (the processor's chat template, image first), greedy decoding, at most 6 new
tokens. Accuracy = exact match of the normalised answer (lowercase, punctuation stripped, whitespace collapsed)
with the one-word ground truth; 95 % Wilson interval. Rows: full tokens (stock ``LlavaForConditionalGeneration``),
and DyMU (``dymu.vlm.enable_dymu`` with the committed DINOv2 thresholds, VTU off or fast). Results are written
after every row (``--out``), so a stopped run keeps the rows done.

Example:
  python eval_scripts/small_vlm_easyvqa.py --per-class 20 --rows full,64out-fast,64out-off,128out-fast,128out-off \
      --out docs/small_vlm_easyvqa.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = {
    "64out": REPO / "checkpoints" / "threshold_checkpoints" / "dinov2-small-224-tome-64out.safetensors",
    "128out": REPO / "checkpoints" / "threshold_checkpoints" / "dinov2-small-224-tome-128out.safetensors",
}


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def balanced_subset(per_class: int, seed: int = 0) -> list[dict]:
    """The fixed class-balanced subset of the easy-VQA test split (see the module docstring)."""
    import easy_vqa

    qs, ans, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    order = list(range(len(qs)))
    random.Random(seed).shuffle(order)
    taken: dict[str, int] = {}
    rows = []
    for i in order:
        a = ans[i]
        if taken.get(a, 0) < per_class:
            taken[a] = taken.get(a, 0) + 1
            rows.append({"index": i, "question": qs[i], "answer": a, "image_id": int(ids[i]),
                         "image": paths[int(ids[i])]})
    return rows


@torch.no_grad()
def answer_batch(model, processor, rows: list[dict], max_new_tokens: int = 6) -> tuple[list[str], list[int]]:
    """Greedy answers and visual tokens per row (256 for the stock model)."""
    from PIL import Image

    from dymu.small_vlm import NUM_IMAGE_TOKENS

    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
        add_generation_prompt=True) for r in rows]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    model.__dict__.pop("dymu_last_counts", None)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    decoded = processor.batch_decode(new, skip_special_tokens=True)
    counts = getattr(model, "dymu_last_counts", None) or [NUM_IMAGE_TOKENS] * len(rows)
    return [d.strip() for d in decoded], list(counts)


def evaluate(model, processor, rows: list[dict], batch: int, label: str, deadline: float | None = None) -> dict:
    from tqdm import tqdm

    preds, counts = [], []
    start = time.perf_counter()
    for s in tqdm(range(0, len(rows), batch), desc=label, file=sys.stdout):
        if deadline is not None and time.time() > deadline:
            break
        p, c = answer_batch(model, processor, rows[s:s + batch])
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="projector safetensors (default: the committed one)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="full,64out-fast,64out-off,128out-fast,128out-off")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--deadline", default=None, help="UTC HH:MM after which no new batch starts")
    ap.add_argument("--out", default=str(REPO / "docs" / "small_vlm_easyvqa.json"))
    ap.add_argument("--no-load-llava", action="store_true", help="use the built model directly")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = None
    if args.deadline:
        import datetime as dt

        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    from dymu.small_vlm import IMAGE_SIZE
    from dymu.vlm import disable_dymu, enable_dymu

    rows = balanced_subset(args.per_class, args.seed)
    model, processor = load_model(args.checkpoint, not args.no_load_llava)
    results = {"subset": {"rule": f"easy-VQA test questions shuffled with random.Random({args.seed}); per answer "
                          f"class the first {args.per_class}", "n": len(rows),
                          "indices": [r["index"] for r in rows]},
               "threads": torch.get_num_threads(), "rows": []}
    out = Path(args.out)
    for label in args.rows.split(","):
        if label == "full":
            res = evaluate(model, processor, rows, args.batch, label, deadline)
        else:
            budget, vtu = label.split("-")
            enable_dymu(model, THRESHOLDS[budget], vtu=vtu)
            # Work-around: dymu.vlm.llava.full_image_tokens computes the placeholders per image from
            # vision_config.image_size (518 for DINOv2, the size its position embeddings were trained at; it
            # interpolates them to 224), i.e. 1369 instead of 256. Set the size we run at while DyMU is on (after
            # dymu.patch, whose encoder identity "dinov2-small" needs 518); no weight or stock code reads it.
            vision_config = model.config.vision_config
            trained_size, vision_config.image_size = vision_config.image_size, IMAGE_SIZE
            try:
                res = evaluate(model, processor, rows, args.batch, label, deadline)
            finally:
                vision_config.image_size = trained_size
                disable_dymu(model)
            res["thresholds"] = str(THRESHOLDS[budget].relative_to(REPO))
        results["rows"].append(res)
        print(f"{label}: {res['correct']}/{res['n']} = {100 * res['accuracy']:.1f}% "
              f"[{100 * res['wilson95'][0]:.1f}, {100 * res['wilson95'][1]:.1f}], visual tokens "
              f"{res['visual_tokens_mean']:.1f} ± {res['visual_tokens_std']:.1f}, {res['seconds']} s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
