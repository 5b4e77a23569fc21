"""Answer a question about an image with LLaVA-1.5 + DyMU and report the visual tokens kept.

MODEL is a llava-hf folder or hub name (a "dymu" block in its config.json turns DyMU on) or an
original LLaVA-1.5 folder (mm_vision_tower naming a DyMU tower such as ViT-L-14-336-tome-72out turns
DyMU on). --thresholds turns it on for any checkpoint.

Examples:
  dymu generate --model llava-hf/llava-1.5-7b-hf --thresholds checkpoints/threshold_checkpoints/ViT-L-14-336-tome-72out.safetensors \\
      --image cat.jpg --prompt "What is in the picture?"
  dymu generate --model checkpoints/vlm_checkpoints/llava-v1.5-7b --image a.jpg --image b.jpg \\
      --prompt "Describe it." --vtu exact
"""

from __future__ import annotations

import argparse

NAME = "generate"
HELP = "answer a question about an image with LLaVA-1.5 + DyMU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="llava-hf or original LLaVA-1.5 checkpoint folder (or hub name)")
    parser.add_argument("--image", action="append", required=True, help="image file; repeat for a batch")
    parser.add_argument(
        "--prompt", action="append", required=True, help="question; one for all images or one per --image"
    )
    parser.add_argument("--thresholds", help="threshold checkpoint (.safetensors, or the authors' .pth)")
    parser.add_argument("--vtu", choices=["fast", "exact", "off"], help="virtual token unmerging (default: config's, else fast)")
    parser.add_argument(
        "--threshold-offset", type=float, help="added to every threshold: > 0 keeps more visual tokens, < 0 fewer"
    )
    parser.add_argument("--token-budget", type=float, help="target mean visual tokens per image (calibrated on the given images)")
    parser.add_argument("--no-dymu", action="store_true", help="run the stock model (for comparison)")
    parser.add_argument("--vision-tower", help="where to load an original checkpoint's CLIP tower from (overrides mm_vision_tower)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="default: float32")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda (default: cpu)")


def run(args: argparse.Namespace) -> int:
    import statistics

    import torch

    from dymu.vlm import answer, load_llava

    images, prompts = args.image, args.prompt
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, or one per --image")
    model, processor = load_llava(
        args.model,
        thresholds=args.thresholds,
        vtu=args.vtu,
        threshold_offset=args.threshold_offset,
        vision_tower=args.vision_tower,
        torch_dtype=getattr(torch, args.dtype),
        dymu=False if args.no_dymu else None,
    )
    model.to(args.device)
    if args.token_budget is not None:
        from dymu.vlm.llava import calibrate_token_budget

        offset = calibrate_token_budget(model, processor, images, args.token_budget)
        print(f"threshold offset for {args.token_budget:g} visual tokens per image: {offset:+.4f}")
    results = answer(model, processor, images, prompts, max_new_tokens=args.max_new_tokens)
    for image, result in zip(images, results):
        print(f"[{image}] ({result.visual_tokens} visual tokens) {result.text}")
    counts = [r.visual_tokens for r in results]
    std = statistics.stdev(counts) if len(counts) > 1 else 0.0
    print(f"visual tokens per image: {statistics.mean(counts):.1f} ± {std:.1f}")
    return 0
