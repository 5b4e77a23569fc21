"""Quick evaluation of LLaVA-1.5 + DyMU on a local JSON of questions, without lmms-eval.

DATA is a JSON list of {"image": "rel/path.jpg", "question": "...", "answer": "..."} records ("answer" may be a
list of accepted answers); images are looked up in --image-dir (default: DATA's folder). Each question is asked
with the checkpoint's prompt suffix appended (its config's "dymu" block: the small VLM's is none), else LLaVA-1.5's
short-answer instruction (--prompt-suffix overrides both), answered greedily, and scored by exact match
and by normalised match (lower case, no punctuation or articles). One JSON line per question goes to --output;
its scores, the visual tokens per image (mean ± std) and the unreadable images are printed and written to
OUTPUT.summary.json.

Resumable: rerun the same command and it continues after the last finished question (the result equals an
uninterrupted run). An image that cannot be read is counted and reported, and the run goes on.

For the paper's benchmarks use lmms-eval with --model dymu_llava (docs/evaluation.md).

Examples:
  dymu eval --model llava-hf/llava-1.5-7b-hf --thresholds ViT-L-14-336-tome-72out --data vqa.json --image-dir images/
  dymu eval --model checkpoints/vlm_checkpoints/llava-v1.5-7b --data vqa.json --vtu exact --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse

NAME = "eval"
HELP = "score LLaVA-1.5 + DyMU on a local JSON of image questions (exact / normalised match, visual tokens)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dymu.commands._args import add_method_argument, int_at_least, positive_float

    parser.add_argument(
        "--model", required=True,
        help="llava-hf or original LLaVA-1.5 checkpoint: a folder or a hub name (HF_HUB_OFFLINE=1: from the cache)",
    )
    parser.add_argument("--data", required=True, help='JSON list of {"image", "question", "answer"} records')
    parser.add_argument("--image-dir", help="folder the image paths are relative to (default: the JSON file's folder)")
    parser.add_argument("--output", help="per-question results, JSONL (default: DATA's name + .dymu_eval.jsonl, in the current folder)")
    parser.add_argument("--thresholds", help="DyMU name, threshold checkpoint (.safetensors, or the authors' .pth)")
    parser.add_argument("--vtu", choices=["fast", "exact", "off"], help="virtual token unmerging (default: config's, else fast)")
    parser.add_argument("--threshold-offset", type=float, help="added to every threshold: > 0 keeps more visual tokens")
    parser.add_argument(
        "--token-budget", type=positive_float,
        help="target mean visual tokens per image, calibrated on the first --calibration-images readable images "
        "(--method tome/prune/random: exactly K tokens per image)",
    )
    add_method_argument(parser)
    parser.add_argument("--calibration-images", type=int_at_least(1), default=32, help="images for --token-budget")
    parser.add_argument(
        "--token-order", choices=["single", "authors", "batch", "raster"],
        help="DToMe token order (default: single — every image merged as the authors' code merges a lone image, "
        "so results do not depend on the batch)",
    )
    parser.add_argument("--no-dymu", action="store_true", help="run the stock model (the full-token baseline)")
    parser.add_argument("--vision-tower", help="where to load an original checkpoint's CLIP tower from")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="questions per forward pass")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=16, help="tokens to generate per answer")
    parser.add_argument(
        "--prompt-suffix", default=None,
        help="appended to every question (default: the checkpoint's own, from the prompt_suffix of its config's "
        "'dymu' block - the small VLM's is none -, else LLaVA-1.5's '\\nAnswer the question using a single word or "
        "phrase.'; '' for none)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from dymu.data import load_image
    from dymu.evaluation import evaluate_questions, read_questions, resolve_pretrained, set_token_order
    from dymu.commands._args import check_writable_file, load_llava_from_args, load_vlm_from_args
    from dymu.vlm.loading import read_config
    from dymu.vlm.qwen_vl import MODEL_CLASSES as QWEN_MODEL_TYPES
    from dymu.vlm import dymu_vtu_mode

    if args.token_budget is not None and args.threshold_offset is not None:
        raise ValueError("give --token-budget or --threshold-offset, not both (the budget sets the offset)")
    if args.no_dymu:
        given = [o for o, v in (("--thresholds", args.thresholds), ("--token-budget", args.token_budget),
                                ("--threshold-offset", args.threshold_offset)) if v is not None]
        if given:
            raise ValueError(f"--no-dymu runs the stock model without merging: drop {' and '.join(given)}")
    questions, image_dir = read_questions(args.data, args.image_dir)
    output = Path(args.output) if args.output else Path(Path(args.data).stem + ".dymu_eval.jsonl")
    check_writable_file(output, "--output")  # before the model load, not after it
    if output.is_file() and not os.access(output, os.W_OK):  # a resumed run appends to it
        raise ValueError(f"cannot write --output {output}: the file is not writable")
    if args.thresholds is not None:
        from dymu.encoders.patching import resolve_thresholds_path

        resolve_thresholds_path(args.thresholds)  # a path, or a DyMU name that resolves
    path = resolve_pretrained(args.model)
    qwen = read_config(path).get("model_type") in QWEN_MODEL_TYPES
    model, processor = (load_vlm_from_args if qwen else load_llava_from_args)(args, path)
    token_order = set_token_order(model, args.token_order)
    settings = {
        "model": str(args.model),
        "thresholds": args.thresholds,
        "vtu": dymu_vtu_mode(model),
        "threshold_offset": args.threshold_offset,
        "token_budget": args.token_budget,
        "method": args.method,
        "token_order": token_order,
        "dtype": args.dtype,
        "dymu": not args.no_dymu,
    }
    if args.token_budget is not None and args.method == "dymu":
        from dymu.vlm.base import calibrate_token_budget

        images = []
        for q in questions:  # the first readable images, in list order: the same on every (re)run
            try:
                images.append(load_image(image_dir / q.image))
            except (FileNotFoundError, ValueError):
                continue
            if len(images) >= args.calibration_images:
                break
        offset = calibrate_token_budget(model, processor, images, args.token_budget)
        print(f"threshold offset for {args.token_budget:g} visual tokens per image: {offset:+.4f} ({len(images)} images)")
    summary = evaluate_questions(
        model,
        processor,
        questions,
        image_dir,
        output,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt_suffix=args.prompt_suffix,  # None: the checkpoint's own, else LLaVA-1.5's short-answer instruction
        settings=settings,
        progress=not args.no_progress,
    )
    for line in summary.lines():
        print(line)
    return 0
