"""DToMe encoder cost: a CLIP ViT-L/14-336-shaped vision tower at 72out/192out/384out vs no merging.

The tower is transformers' ``CLIPVisionModel`` built from a config (24 layers, hidden 1024, 16 heads,
MLP 4096, 336 px, patch 14 → 577 tokens) with random weights; only shapes matter for time. Thresholds
for each "Kout" setting are found on the random tower itself with
``merge_counts=merge_schedule("constant", 576 - K, layers)`` over a calibration batch of built-in images,
then every configuration is timed in the same run, in interleaved rounds (each round runs every run of every
configuration once, so the drift of a shared machine hits all alike):

* batch 1: each of the evaluation images alone (images of graded complexity from :mod:`dymu.samples`);
* batch B (default 8): all of them together — with DToMe they keep different numbers of tokens, so the
  batch is padded to the largest count in every layer.

Figures per configuration: median times and the speed-up vs no merging; visual tokens per image after the last
block (CLS excluded; mean ± std over the images); the share of the batch-B forward spent in merge bookkeeping
(``DToMeState.merge``: scoring, matching, size-weighted merge and source map); batch efficiency = Σ_i t₁(image
i) / t_B — the images one by one over the batch-B run (medians; 1.0 = batching costs exactly as much as
running the images one by one; padding to the largest count pushes it down, better hardware utilisation pushes
it up — compare with the "none" row, which has no padding); and the peak memory of one batch-B forward.

Ideal: the stock blocks at exactly the merged run's per-image, per-layer counts — attention at a block's input
count, the MLP at its output count (DToMe merges between them) — image by image, with no bookkeeping: the best
any DToMe implementation could do. The merged runs (images alone; the padded batch; ``dymu.encode(batching=
"per_image")``) are each timed right before their ideal, in the same rounds; fraction of ideal = ideal time /
merged time (batch: the better of padded and per image).

With fewer layers than 24 (the CPU default, ``--layers 8``) the same final count K is reached over
fewer layers (``r_total = 576 - K`` spread over them), so the token-count profile keeps its shape.

``--real``: the real DINOv2-S/14 (``dymu weights install dinov2-small``, 12 layers) at ``--image-size`` 224 or 448
instead of the random tower, with the committed threshold checkpoints for that size
(``checkpoints/threshold_checkpoints/dinov2-small-<size>-tome-<K>out.safetensors``; no finding) and real images:
bundled photographs (scikit-image / scikit-learn) and easy-VQA test images, mixed in one batch.

Examples:
  python -m bench.encoder                     # 8 layers on CPU (a few minutes on 2 cores)
  python -m bench.encoder --real --image-size 448 --threads 2   # DINOv2-S, 1,024 patches, photos + easy-VQA
  python -m bench.encoder --full              # all 24 layers
  python -m bench.encoder --device cuda --dtype float16
  dymu bench encoder --tiny
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Sequence

import torch

import dymu
from dymu.bench.encoder_setup import MergeTimer, build_tower, evaluation_images, merged_counts, real_setup
from dymu.bench.memory import maxrss_bytes, memory_method, peak_memory
from dymu.bench.options import add_common_arguments, apply_threads, argument_parser, make_main, resolve_device
from dymu.bench.report import (
    Target, closing_lines, compare_to_first, environment_line, format_table, human_bytes, mean_std,
)
from dymu.bench.timing import interleaved, sync
from dymu.bench.towers import ideal_runner
from dymu.samples import image_set


FULL_LAYERS = 24
REAL_LAYERS = 12  # DINOv2-S/14


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m bench.encoder", __doc__)
    p.add_argument("--layers", type=int, help="encoder blocks (default: 8 on CPU, 24 on CUDA)")
    p.add_argument("--full", action="store_true", help="all 24 blocks of ViT-L/14-336")
    p.add_argument("--outs", default="72,192,384", help="final visual token counts K to test (default: 72,192,384)")
    p.add_argument("--batch", type=int, default=8, help="images in the batched run (default: 8)")
    p.add_argument("--calibration", type=int, default=8, help="images in the threshold-finding batch (default: 8)")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp", type=int, default=4096)
    p.add_argument("--real", action="store_true",
                   help="real DINOv2-S weights, committed thresholds, photos + easy-VQA images (needs dymu[real])")
    p.add_argument("--photos", type=int, default=5,
                   help="with --real: photographs in the batch, the rest easy-VQA images (default: 5)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared VM; with --threads 1 "
                        "it is the work done; CPU only)")
    add_common_arguments(p, repeats=3)
    args = p.parse_args(argv)
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        p.error("--clock cpu measures host CPU time; use it with --device cpu")
    if args.real:
        if args.tiny or args.full:
            p.error("--real runs the real 12-layer DINOv2-S; it does not combine with --tiny or --full")
        if args.image_size not in (224, 448):
            p.error("--real: --image-size must be 224 or 448 (the committed checkpoints' sizes), "
                    f"got {args.image_size}")
        if not 0 <= args.photos <= args.batch:
            p.error(f"--photos must be in 0..--batch ({args.batch}), got {args.photos}")
        args.layers, args.patch_size, args.out_list = REAL_LAYERS, 14, []
        return args
    if args.tiny:
        args.layers, args.image_size, args.hidden, args.heads, args.mlp = 3, 84, 64, 4, 128
        args.outs, args.batch, args.calibration, args.repeats, args.warmup = "12,18,24", 4, 4, 1, 1
    if args.full:
        args.layers = FULL_LAYERS
    if args.layers is None:
        args.layers = FULL_LAYERS if args.device.startswith("cuda") else 8
    args.out_list = [int(v) for v in str(args.outs).split(",") if v.strip()]
    patches = (args.image_size // args.patch_size) ** 2
    for k in args.out_list:
        if not 1 <= k < patches:
            p.error(f"--outs: each K must be in 1..{patches - 1} (patches per image), got {k}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; return every figure (also what :func:`format_results` prints)."""
    apply_threads(args.threads)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    patches = (args.image_size // args.patch_size) ** 2
    image_names: list[str] = []
    t0 = time.perf_counter()
    if args.real:  # real weights, committed thresholds, real images
        model, thresholds, image_names, batch = real_setup(args, device, dtype)
        args.batch = batch.shape[0]
    else:
        model, processor = build_tower(args, device, dtype)

        def pixels(images: list) -> torch.Tensor:
            return processor(images=images, return_tensors="pt").pixel_values.to(device, dtype)

        calib = pixels(image_set(args.calibration, args.image_size))
        batch = pixels(evaluation_images(args.batch, args.image_size))
        # -- thresholds per Kout, found on the random tower
        thresholds = {}
        dymu.patch(model)
        for k in args.out_list:
            counts = dymu.merge_schedule("constant", patches - k, args.layers)
            dymu.configure(model, merge_counts=counts)
            with torch.inference_mode():
                model(pixel_values=calib)
            thresholds[f"{k}out"] = list(dymu.last_run(model).found_thresholds)
        dymu.unpatch(model)
    finding_s = time.perf_counter() - t0
    singles = [batch[i : i + 1] for i in range(args.batch)]

    def forward(x: torch.Tensor):
        with torch.inference_mode():
            return model(pixel_values=x).last_hidden_state

    layers = model.encoder.layers if hasattr(model.encoder, "layers") else model.encoder.layer  # CLIP / DINOv2
    configs: list[tuple[str, Any]] = [("none", None)] + list(thresholds.items())

    def merging(th):
        def switch() -> None:
            dymu.unpatch(model)
            if th is not None:
                dymu.patch(model, th)
        return switch

    def no_grad(fn):
        def call():
            with torch.inference_mode():
                return fn()
        return call

    merge_seconds: dict[str, list[float]] = {name: [] for name, _ in configs}

    def padded_batch(name: str):
        """The padded batch; on CPU the time inside DToMeState.merge is added up during the timed run itself
        (no sync needed), on CUDA in one extra run below (the syncs it needs would perturb the timed runs)."""
        def call():
            timer = MergeTimer(dymu.get_state(model) if name != "none" else None, device, clock)
            with timer.active(device.type != "cuda"):
                out = forward(batch)
            merge_seconds[name].append(timer.seconds)
            return out
        return call

    # every run of every config in interleaved rounds (each once per round), each merged run next to its ideal,
    # so the drift of a shared machine hits all alike
    rounds: dict[tuple[str, str], tuple[Any, Any]] = {}
    counts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, th in configs:
        rounds[(name, "b1")] = (merging(th), no_grad(lambda: [model(pixel_values=x) for x in singles]))
        if th is not None:
            counts[name] = alone, per_batch = merged_counts(model, th, singles, batch)
            ideal = {key: ideal_runner(model.embeddings, layers, c, singles, width=model.config.hidden_size,
                                       seed=args.seed, device=device, dtype=dtype)
                     for key, c in (("alone", alone), ("batch", per_batch))}
            rounds[(name, "ideal_b1")] = (merging(None), ideal["alone"])
        rounds[(name, "padded")] = (merging(th), padded_batch(name))
        if th is not None:
            rounds[(name, "per_image")] = (
                merging(th), no_grad(lambda: dymu.encode(model, batch, batching="per_image")))
            rounds[(name, "ideal_batch")] = (merging(None), ideal["batch"])
    medians, _ = interleaved(rounds, args.repeats, args.warmup, device, clock=clock)

    rows: list[dict[str, Any]] = []
    for name, th in configs:
        merging(th)()
        t_batch = medians[(name, "padded")]
        share = statistics.median(merge_seconds[name][args.warmup:]) / t_batch if th is not None else 0.0
        if th is not None and device.type == "cuda":
            timer = MergeTimer(dymu.get_state(model), device, clock)
            with timer.active(True):
                sync(device)
                t = clock()
                forward(batch)
                sync(device)
                share = timer.seconds / (clock() - t)
        peak, _ = peak_memory(lambda: forward(batch), device)
        row: dict[str, Any] = {"config": name, "batch1_sum_s": medians[(name, "b1")], "batch_s": t_batch,
                               "merge_share": share, "peak_bytes": peak,
                               "ideal_s": None}
        if th is not None:
            tokens = (dymu.last_run(model).tokens_per_layer()[-1] - 1).tolist()  # CLS excluded
            row.update(ideal_s=medians[(name, "ideal_b1")], ideal_batch_s=medians[(name, "ideal_batch")],
                       per_image_s=medians[(name, "per_image")], per_layer_alone=counts[name][0].tolist(),
                       per_layer_batch=counts[name][1].tolist())
        else:
            tokens = [patches] * args.batch
        row["batch1_s"] = row["batch1_sum_s"] / len(singles)
        row["tokens"] = tokens
        row["tokens_mean"], row["tokens_std"] = mean_std(tokens)
        rows.append(row)
    dymu.unpatch(model)

    base = rows[0]
    for r in rows:
        r["batch_efficiency"] = r["batch1_sum_s"] / r["batch_s"]
    compare_to_first(rows, speedups={"speedup_batch1": "batch1_s", "speedup_batch": "batch_s"},
                     ratios={"batch_efficiency_vs_none": "batch_efficiency", "peak_vs_none": "peak_bytes"})
    for r in rows:
        # ideal: the stock blocks at the merged run's per-image, per-layer counts, one image at a time; the best a
        # DToMe implementation could do. Fraction of ideal = ideal time / merged time (batch: the better of the
        # padded batch and the images one by one, dymu.encode(batching="per_image"))
        if r["ideal_s"] is not None:
            r["ideal_fraction_batch1"] = r["ideal_s"] / r["batch1_sum_s"]
            r["ideal_fraction_batch"] = r["ideal_batch_s"] / min(r["batch_s"], r["per_image_s"])
            r["per_image_vs_padded"] = r["batch_s"] / r["per_image_s"]

    targets = []
    for r in rows[1:]:
        targets.append(Target(f"{r['config']} batch 1: fraction of the ideal (stock blocks at the merged counts)",
                              r["ideal_fraction_batch1"], 0.9, unit=""))
        targets.append(Target(f"{r['config']} batch {args.batch}: fraction of the ideal (better of padded / per "
                              "image)", r["ideal_fraction_batch"], 0.85, unit=""))
        targets.append(Target(f"{r['config']} batch {args.batch}: never slower than no merging (speed-up)",
                              base["batch_s"] / min(r["batch_s"], r["per_image_s"]), 1.0))
    first = rows[1] if len(rows) > 1 else None
    if first is not None:
        # dymu.encode's default batching: image by image on CPU, padded elsewhere (its docstring)
        default = "per_image_s" if device.type == "cpu" else "batch_s"
        targets.append(Target(f"encoder at {first['config']} speed-up vs no merging (batch {args.batch}, "
                              f"dymu.encode's default: {'per image' if device.type == 'cpu' else 'padded'})",
                              base["batch_s"] / first[default], 1.6))
        targets.append(Target(f"batch-{args.batch} efficiency at {first['config']} (sum of batch-1 times / batch time)",
                              first["batch_efficiency"], 0.9, unit=""))
    return {
        "benchmark": "encoder", "layers": args.layers, "calibration": args.calibration, "full_layers": FULL_LAYERS, "batch": args.batch,
        "image_size": args.image_size, "patches": patches, "repeats": args.repeats, "warmup": args.warmup,
        "device": str(device), "dtype": args.dtype,
        "environment": environment_line(device, dtype) + f"; {args.clock} clock",
        "thresholds": {k: (v if isinstance(v, list) else list(map(float, v.thresholds)))
                       for k, v in thresholds.items()},
        "finding_s": finding_s, "real": bool(args.real), "images": image_names, "rows": rows,
        "targets": [t.as_dict() for t in targets],
        "_targets": targets, "memory_method": memory_method(device), "maxrss_bytes": maxrss_bytes(),
    }


def format_results(res: dict[str, Any]) -> str:
    if res.get("real"):
        lines = [
            f"DToMe encoder benchmark: real DINOv2-S/14 at {res['image_size']} px, {res['layers']} layers, "
            f"{res['patches']} patches + CLS",
            res["environment"],
            "thresholds: the committed checkpoints (checkpoints/threshold_checkpoints/dinov2-small-"
            f"{res['image_size']}-tome-*out); images: " + ", ".join(res["images"]),
        ]
    else:
        lines = [
            f"DToMe encoder benchmark: CLIP ViT-L/14-{res['image_size']}-shaped tower (random weights), "
            f"{res['layers']} of {res['full_layers']} layers, {res['patches']} patches + CLS",
            res["environment"],
        ]
    if not res.get("real") and res["layers"] < res["full_layers"]:
        lines.append(
            f"note: {res['layers']} layers only (run --full for all {res['full_layers']}); each Kout reaches the "
            "same final count over these layers, so the token-count profile keeps its shape."
        )
    if not res.get("real"):
        lines.append(
            f"thresholds: found on the random tower itself, one calibration batch of {res['calibration']} built-in "
            f"images ({res['finding_s']:.1f} s); note: random weights make the per-image spread of token counts unlike "
            "a real CLIP's.")
    lines += [
        f"times: median of {res['repeats']} interleaved round(s) after {res['warmup']} warm-up round(s), every run of "
        "every config once per round (drift cancels); batch 1 = the images one after another, per image; speed-up "
        "= none's time / this time",
        "batch eff = the images' batch-1 time / batch time (ideal 1.0; 'vs none' divides by the "
        "no-merge row's value, isolating the cost of padding to the largest count)",
        "merge share = time inside DToMeState.merge (scoring, matching, weighted merge, source map) / forward time, "
        "batch run",
        f"peak memory: {res['memory_method']}",
        "of_ideal = ideal time / merged time, each ideal timed right after its merged run; ideal = the stock blocks "
        "at exactly the merged run's per-image, per-layer counts (attention at a block's input count, MLP at its "
        f"output count), image by image, no bookkeeping; b{res['batch']}: the better of the padded batch and "
        "dymu.encode(batching='per_image') (same counts as the batch); pad/per_img = padded time / per-image time",
        "",
    ]
    table = [
        [r["config"], f"{r['tokens_mean']:.1f} ± {r['tokens_std']:.1f}", r["batch1_s"], f"{r['speedup_batch1']:.2f}x",
         r["batch_s"], f"{r['speedup_batch']:.2f}x", f"{r['batch_efficiency']:.3f}", f"{r['batch_efficiency_vs_none']:.3f}",
         f"{100 * r['merge_share']:.1f}%", human_bytes(r["peak_bytes"]), f"{r['peak_vs_none']:.3f}",
         "—" if r["ideal_s"] is None else f"{r['ideal_fraction_batch1']:.2f}",
         "—" if r["ideal_s"] is None else f"{r['ideal_fraction_batch']:.2f}",
         "—" if r["ideal_s"] is None else f"{r['per_image_vs_padded']:.2f}"]
        for r in res["rows"]
    ]
    b = res["batch"]
    lines.append(format_table(
        ["config", "tokens/img", "b1_s/img", "b1_speedup", f"b{b}_s", f"b{b}_speedup", "batch_eff", "eff_vs_none",
         "merge_share", f"peak_b{b}", "peak_vs_none", "b1_of_ideal", f"b{b}_of_ideal", "pad/per_img"],
        table,
    ))
    lines.append("")
    lines.append("tokens per image after the last block (batch order: " + ", ".join(
        f"{r['config']}: {r['tokens']}" for r in res["rows"][1:]) + ")")
    lines += closing_lines(res)
    return "\n".join(lines)


main = make_main(parse_args, run, format_results)


if __name__ == "__main__":
    raise SystemExit(main())
