"""DToMe inside a Qwen2.5-VL-7B-shaped vision tower: stock vs merged at a few kept shares, CPU ratios side by side.

The tower is transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` built from a config of the 7B model's
vision shape (width 1280, 16 heads, MLP 3420, output 3584, patch 14, windows of 112 px = 4×4 units, a
full-attention block every 8th) with random weights; only shapes matter for time. ``--layers`` keeps the
first blocks (CPU default 4; the 7B tower has 32, full attention at 7, 15, 23, 31 — with fewer, the last block is
full attention). Images of graded complexity (``dymu.samples``, flat to busy) at ``--image-size`` px.
Thresholds for each ``--keep`` share (``-tome-<P>pct``: that share of the merged-grid cells kept per frame on the
finding images) are found on other images of the same kinds (constant schedule), then every row is timed in
interleaved rounds (on CPU: this process's CPU time, steadier on a shared machine). Per row: median time,
speed-up vs stock, cells kept per image (mean; stock: h·w/4), and ``rel_dev`` = ‖merged output expanded to its
cells − stock output‖ / ‖stock output‖ with each merged token at the centroid of its cells (the default) and at
its first unit's position — on random weights a rough proxy only.

Examples:
  python -m bench.qwen_tower --threads 2              # 4 blocks, 224 px, 4 images
  python -m bench.qwen_tower --layers 32 --image-size 448 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import numpy as np
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionConfig,
)

import dymu
from dymu.bench.memory import maxrss_bytes
from dymu.bench.options import add_common_arguments, apply_threads, argument_parser, make_main, resolve_device
from dymu.bench.report import environment_line, printout
from dymu.bench.timing import interleaved
from dymu.bench.towers import graded_images
from dymu.encoders.qwen_vl import keep_fraction_merge_counts, patchify


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m bench.qwen_tower", __doc__)
    p.add_argument("--layers", type=int, default=4, help="vision blocks (default 4; Qwen2.5-VL-7B has 32)")
    p.add_argument("--image-size", type=int, default=224, help="image side in px, a multiple of 28 (default 224)")
    p.add_argument("--images", type=int, default=4, help="images in the batch, flat to busy (default 4)")
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25], help="kept shares (default 0.5 0.25)")
    add_common_arguments(p, repeats=3)
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.image_size, args.images, args.repeats, args.warmup, args.keep = 2, 112, 2, 1, 0, [0.5]
    return args


def _tower(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    width = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 64}
    if not args.tiny:
        width = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584}
    full = [i for i in range(args.layers) if i % 8 == 7 or i == args.layers - 1]
    config = Qwen2_5_VLVisionConfig(depth=args.layers, window_size=112, fullatt_block_indexes=full, **width)
    torch.manual_seed(args.seed)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa")
    return model.to(device, dtype).eval()


def _images(
    size: int, n: int, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in graded_images(n, size, seed)]  # flat ... busy
    pixels = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 0.5) / 0.25
    flat, grid = patchify(pixels, 14, 2, 2)
    return flat.to(device, dtype), grid.to(device)


def _rel_dev(images: list[Any], stock: torch.Tensor) -> float:
    """‖merged expanded to cells − stock‖ / ‖stock‖ over the batch (stock rows in per-image raster order)."""
    expanded = torch.cat([m.features[m.source_map] for m in images]).float()
    return float((expanded - stock.float()).norm() / stock.float().norm())


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    apply_threads(args.threads)
    model = _tower(args, device, dtype)
    if args.image_size % 28:
        raise SystemExit(f"--image-size must be a multiple of 28 (patch 14 x merge 2), got {args.image_size}")
    cells = (args.image_size // 28) ** 2
    x, grid = _images(args.image_size, args.images, 100, device, dtype)
    finding = _images(args.image_size, 2 * args.images, 200, device, dtype)
    with torch.no_grad():
        stock = model(x, grid_thw=grid).pooler_output
    found, kept, dev = {}, {}, {}
    for keep in args.keep:
        dymu.patch(model, merge_counts=keep_fraction_merge_counts(cells, keep, args.layers))
        with torch.no_grad():
            model(*finding)
        found[keep] = list(dymu.get_state(model).run.found_thresholds)
        dymu.configure(model, thresholds=found[keep])
        for rule in ("centroid", "first"):
            dymu.get_state(model).position_rule = rule
            with torch.no_grad():
                model(x, grid_thw=grid)
            images = dymu.get_state(model).images
            dev[keep, rule] = _rel_dev(images, stock)
        kept[keep] = sum(len(m.features) for m in images) / len(images)
        dymu.unpatch(model)

    def patched(keep):
        def call():
            dymu.patch(model, thresholds=found[keep])
            try:
                return model(x, grid_thw=grid)
            finally:
                dymu.unpatch(model)
        return call

    configs = {"stock": (lambda: None, lambda: model(x, grid_thw=grid))}
    configs.update({keep: (lambda: None, patched(keep)) for keep in args.keep})
    with torch.no_grad():
        # CPU time of this process on CPU (steadier on a shared machine), wall time on a GPU
        clock = time.process_time if device.type == "cpu" else time.perf_counter
        times, _ = interleaved(configs, args.repeats, args.warmup, device, clock=clock)
    rows = [("no merging", times["stock"], 1.0, float(cells), "-", "-")]
    rows += [(f"DToMe -tome-{round(100 * k)}pct", times[k], times["stock"] / times[k], kept[k],
              f"{dev[k, 'centroid']:.4f}", f"{dev[k, 'first']:.4f}") for k in args.keep]
    return {"rows": rows, "cells": cells, "env": environment_line(device, dtype), "args": args,
            "maxrss_bytes": maxrss_bytes(), "_targets": []}


def format_results(res: dict[str, Any]) -> str:
    a = res["args"]
    headers = ["config", "median_s", "speed-up", "cells/img", "rel_dev centroid", "rel_dev first"]
    table = [(n, f"{t:.4f}", f"{s:.2f}x", f"{c:.1f}", d1, d2) for n, t, s, c, d1, d2 in res["rows"]]
    clock = " (process CPU time)" if a.device == "cpu" else ""
    heading = [f"Qwen2.5-VL-7B-shaped vision tower: {a.layers} block(s), {a.images} images of {a.image_size} px "
               f"({res['cells']} cells each) flat to busy; {res['env']}",
               f"median of {a.repeats} interleaved round(s) after {a.warmup} warm-up round(s){clock}"]
    return printout(heading, headers, table, res)


main = make_main(parse_args, run, format_results)
