"""LLaVA-OneVision crops of mixed complexity through the DToMe SigLIP tower: padded batch vs one call per crop.

An anyres image gives a base crop plus tiles; flat tiles keep few tokens, busy ones many. In one padded batch
every crop costs as much as the longest. This times, side by side, a OneVision-shaped SigLIP tower (SO400M/14-384
width: hidden 1152, MLP 4304, 16 heads, 729 patches per crop; fewer blocks than its 26 on CPU, the ratios are
per block) on ``--crops`` crops ranging from flat to busy (``dymu.samples``):

* ``no merging``: the stock tower on the crop batch (ratio 1.0);
* ``DToMe padded``: one patched forward, crops padded to the longest (``dymu.encode(batching="padded")``);
* ``DToMe per crop``: one patched forward per crop, no padding (``batching="per_image"``, same outputs);
* ``ideal``: the stock blocks at exactly the per-crop, per-block token counts of the merged run, one crop at a
  time, no merging bookkeeping — what any implementation of DToMe could at best reach.

Thresholds are found (constant schedule, ``--keep`` patches per crop on average) on a separate set of crops of
the same kinds. Targets (PASS/MISS, not asserted): the better DToMe row at least 0.85 of the ideal speed-up, and
never slower than no merging.

Examples:
  python -m bench.onevision_crops --layers 4 --crops 6 --threads 1
  python -m bench.onevision_crops --device cuda --dtype bfloat16 --layers 26 --crops 10
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

import dymu
from dymu.bench.memory import maxrss_bytes
from dymu.bench.options import add_common_arguments, apply_threads, argument_parser, make_main, resolve_device
from dymu.bench.report import Target, environment_line, printout
from dymu.bench.timing import interleaved
from dymu.bench.towers import graded_images, ideal_runner


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m bench.onevision_crops", __doc__)
    p.add_argument("--layers", type=int, default=4, help="SigLIP blocks (default 4; OneVision's tower has 26)")
    p.add_argument("--crops", type=int, default=6, help="crops in the batch, flat to busy (default 6)")
    p.add_argument("--keep", type=int, default=240, help="patches kept per crop on average, of 729 (default 240)")
    add_common_arguments(p, repeats=3)
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.crops, args.keep, args.repeats, args.warmup = 2, 4, 30, 1, 0
    return args


def _tower(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, int]:
    if args.tiny:
        config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                                    num_attention_heads=4, image_size=112, patch_size=14, vision_use_head=False)
    else:  # as in LLaVA-OneVision: no pooling head (the VLM reads the patch tokens)
        config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.layers,
                                    num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    torch.manual_seed(args.seed)
    model = SiglipVisionModel(config).to(device, dtype).eval()
    size = config.image_size
    processor = SiglipImageProcessor(size={"height": size, "width": size})
    return model, processor, size


def _crops(processor: Any, size: int, n: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    images = graded_images(n, size, seed)  # flat ... busy
    return processor(images=images, return_tensors="pt").pixel_values.to(device, dtype)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    apply_threads(args.threads)
    model, processor, size = _tower(args, device, dtype)
    patches = (size // 14) ** 2
    x = _crops(processor, size, args.crops, 100, device, dtype)
    finding = _crops(processor, size, 2 * args.crops, 200, device, dtype)

    counts = dymu.merge_schedule("constant", patches - args.keep, args.layers)
    dymu.patch(model, merge_counts=counts)
    with torch.no_grad():
        model(pixel_values=finding)
    thresholds = dymu.last_run(model).found_thresholds
    dymu.configure(model, thresholds=thresholds, token_order="batch")
    enc = dymu.encode(model, x, layer=-1, stop_early=False)
    enc_pc = dymu.encode(model, x, layer=-1, batching="per_image")
    per_layer = enc.tokens_per_layer  # [L+1, crops]
    same = per_layer.tolist() == enc_pc.tokens_per_layer.tolist()
    dymu.unpatch(model)
    # ideal: the stock blocks at exactly each crop's counts (attention at the block's input, MLP after its merge)
    ideal = ideal_runner(model.embeddings, model.encoder.layers, per_layer, list(x.split(1)),
                         width=model.config.hidden_size, seed=args.seed, device=device, dtype=dtype)

    def patched(fn):
        def call():
            dymu.patch(model, thresholds, token_order="batch")
            try:
                return fn()
            finally:
                dymu.unpatch(model)
        return call

    def none() -> None:
        pass

    configs = {
        "stock": (none, lambda: model(pixel_values=x)),
        "padded": (none, patched(lambda: dymu.encode(model, x, layer=-1, stop_early=False))),
        "per_crop": (none, patched(lambda: dymu.encode(model, x, layer=-1, batching="per_image"))),
        "ideal": (none, ideal),
    }
    with torch.no_grad():  # interleaved rounds: the drift of a shared machine hits every row alike
        times, _ = interleaved(configs, args.repeats, args.warmup, device)
    t_stock, t_padded, t_per_crop, t_ideal = (times[n] for n in configs)
    kept = per_layer[-1].tolist()
    rows = [
        ("no merging", t_stock, 1.0),
        ("DToMe padded", t_padded, t_stock / t_padded),
        ("DToMe per crop", t_per_crop, t_stock / t_per_crop),
        ("ideal (stock blocks at the merged counts)", t_ideal, t_stock / t_ideal),
    ]
    best = max(t_stock / t_padded, t_stock / t_per_crop)
    targets = [
        Target("best DToMe row, fraction of the ideal speed-up", best / (t_stock / t_ideal), 0.85),
        Target("best DToMe row vs no merging (speed-up, never slower)", best, 1.0),
    ]
    return {
        "rows": rows, "kept": kept, "patches": patches, "same_counts": same, "_targets": targets,
        "env": environment_line(device, dtype), "args": args, "maxrss_bytes": maxrss_bytes(),
    }


def format_results(res: dict[str, Any]) -> str:
    a = res["args"]
    heading = [
        f"OneVision-shaped SigLIP tower: {a.layers} block(s), {res['patches']} patches per crop, {a.crops} crops "
        f"flat to busy; {res['env']}",
        f"patches kept per crop (DToMe, thresholds for ~{a.keep} on other crops): {res['kept']} "
        f"(mean {sum(res['kept']) / len(res['kept']):.0f}); per-crop counts equal to the padded run's: "
        f"{res['same_counts']}",
        f"median of {a.repeats} interleaved round(s) (every row once per round) after {a.warmup} warm-up round(s)",
    ]
    table = [(name, f"{t:.4f}", f"{s:.2f}x") for name, t, s in res["rows"]]
    return printout(heading, ["config", "median_s", "speed-up vs no merging"], table, res)


main = make_main(parse_args, run, format_results)
