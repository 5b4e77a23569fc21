"""`dymu thresholds` and `dymu encode` on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder: DToMe in its tower.

Finding squashes each listed image to --image-size (a multiple of 28/32) and normalises it with the checkpoint's
image processor's mean/std; the budget is --keep-percent P, the share of merged-grid cells kept per frame on the
finding images, and the default output is <checkpoint folder>/<identity>-tome-<P>pct.safetensors (docs/qwen_vl.md).
Encoding runs the checkpoint's own image processor (dynamic resolution: pixel_values + image_grid_thw)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dymu
from dymu import finding
from dymu.data import SquashResize, load_image, read_image_list
from dymu.encoders.names import checkpoint_dir
from dymu.encoders.qwen_vl import image_cells, keep_fraction_merge_counts, tower_identity


def _tower_and_processor(folder: str, dtype):
    # transformers takes seconds to import and `dymu --help` imports every command module: imported when used
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    return model.model.visual.eval(), AutoProcessor.from_pretrained(folder)


def run_thresholds(args: argparse.Namespace, family: str) -> int:
    if args.keep_percent is None:
        raise ValueError("a Qwen-VL checkpoint takes the budget as --keep-percent P (the -tome-<P>pct names), "
                         "not --r-total / --out-tokens")
    if args.r_total is not None or args.out_tokens is not None:
        raise ValueError("a Qwen-VL checkpoint takes --keep-percent P only; drop --r-total / --out-tokens")
    images = read_image_list(args.data, args.image_dir, max_images=args.max_images)
    tower, processor = _tower_and_processor(args.model, getattr(torch, args.dtype))
    unit = tower.config.patch_size * tower.spatial_merge_size
    if args.image_size % unit:
        raise ValueError(f"--image-size must be a multiple of {unit} (patch {tower.config.patch_size} x merge "
                         f"{tower.spatial_merge_size}) for this tower, got {args.image_size}")
    cells = (args.image_size // unit) ** 2
    schedule = args.schedule or "constant"
    counts = keep_fraction_merge_counts(cells, args.keep_percent / 100, len(tower.blocks), schedule)
    name = f"{tower_identity(family, tower.config)}-tome-{args.keep_percent}pct"
    output = Path(args.output) if args.output else checkpoint_dir() / f"{name}.safetensors"
    ip = processor.image_processor
    result = finding.find_thresholds(
        tower, images, SquashResize(args.image_size, tuple(ip.image_mean), tuple(ip.image_std)),
        merge_counts=counts, schedule=schedule, batch_size=args.batch_size, output=output,
        resume=not args.restart, overwrite=args.overwrite, num_workers=args.num_workers,
        token_order=args.token_order, progress=not args.quiet, max_batches=args.max_batches,
        model_source=str(args.model),
    )
    print(f"{name}: {len(counts)} blocks, {schedule} schedule, keep {args.keep_percent}% of {cells} cells per "
          f"frame at {args.image_size} px; images seen: {result.images_seen}")
    for i, (r, t) in enumerate(zip(counts, result.checkpoint.thresholds.tolist())):
        print(f"{i:>5} {r:>4} {t:>10.6f}")
    print(f"wrote {result.output}" if result.output is not None else "stopped early: run again to resume")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    if args.thresholds is None:
        raise ValueError("a Qwen-VL checkpoint needs --thresholds (a -tome-<P>pct checkpoint file)")
    if args.token_budget is not None or args.per_layer:
        raise ValueError("--token-budget and --per-layer are not supported for Qwen-VL checkpoints")
    if args.layer is not None:  # the tokens counted are the PatchMerger's outputs, after the last block
        raise ValueError("--layer is not supported for Qwen-VL checkpoints: the count is after the PatchMerger")
    pil = [load_image(p) for p in args.images]
    tower, processor = _tower_and_processor(args.model, getattr(torch, args.dtype))
    dymu.patch(tower, thresholds=args.thresholds, threshold_offset=args.threshold_offset or 0.0,
               token_order=args.token_order)
    kept, stock = [], []
    for img in pil:  # one image per call: its own processor resolution
        inputs = processor.image_processor(images=[img], return_tensors="pt")
        with torch.no_grad():
            tower(inputs["pixel_values"].to(tower.dtype), grid_thw=inputs["image_grid_thw"])
        kept.append(sum(len(m.features) for m in dymu.get_state(tower).images))
        stock.append(sum(image_cells(inputs["image_grid_thw"], tower.spatial_merge_size)))
    if args.json:
        print(json.dumps({"images": [{"path": p, "tokens": k, "stock_tokens": s}
                                     for p, k, s in zip(args.images, kept, stock)]}, indent=2))
        return 0
    for path, k, s in zip(args.images, kept, stock):
        print(f"{path}: {k} tokens (stock {s})")
    print(f"mean: {sum(kept) / len(kept):.1f} tokens")
    return 0
