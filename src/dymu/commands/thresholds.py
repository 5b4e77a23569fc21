"""Find DToMe thresholds of a vision encoder over an image dataset and save them as a checkpoint.

The dataset is a JSON list of {"image": "relative/path.jpg"} records (the DyMU authors' format; LLaVA data
files work, text-only records are skipped) with the images under --image-dir. Global batch i is entries
[i*B, (i+1)*B); a missing or unreadable image is skipped, counted and reported, and only its own batch gets
smaller. After every batch the running state is saved next to the output (<output>.resume.pt): run the same
command again after a crash to continue where it stopped; other settings are refused (--restart starts over).

With torchrun, each process takes a contiguous slice of every global batch (--batch-size is the global batch)
and the per-layer selection is made over all processes together: the thresholds equal a single-process run's.

--model is a DyMU name (fixes the budget and schedule), a transformers folder or hub name of a CLIP / SigLIP /
DINOv2 vision model, an installed weights name (dinov2-small, see `dymu weights`), or open_clip:MODEL[:PRETRAINED].
The output is a .safetensors checkpoint, by default <checkpoint folder>/<DyMU name>.safetensors, where the
checkpoint folder is $DYMU_CHECKPOINT_DIR if set, else ./checkpoints/threshold_checkpoints (DyMU names are looked
up there, then among the checkpoints shipped with dymu). DINOv2 names carry the input side:
dinov2-small-224-tome-64out.

A Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder as --model finds its vision tower's thresholds: the budget is
--keep-percent P (share of cells kept per frame on the finding images, squashed to --image-size), the name
<identity>-tome-<P>pct (docs/qwen_vl.md).

Ctrl-C stops after the last finished batch was saved: run the same command again to resume.

Examples:
  dymu thresholds --model ViT-L-14-336-tome-72out --data images.json --image-dir images/
  dymu thresholds --model siglip-so400m-patch14-384-256out --data llava_mix.json --image-dir data/ --batch-size 64
  dymu thresholds --model ./my-clip --out-tokens 100 --schedule linear --data images.json --max-images 5000
  dymu thresholds --model open_clip:ViT-L-14-336:openai --r-total 504 --data images.json
  torchrun --nproc_per_node 8 -m dymu thresholds --model ViT-L-14-336-tome-72out --data images.json
  dymu thresholds --model dinov2-small --out-tokens 64 --data images.json     # -> dinov2-small-224-tome-64out
  dymu thresholds --model ./Qwen2.5-VL-7B --keep-percent 25 --data images.json  # -> qwen2_5_vl-p14-d1280-l32-tome-25pct
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from dymu import finding
from dymu.commands._args import (
    add_schedule_argument,
    add_token_order_argument,
    check_writable_file,
    checkpoint_model_type,
    int_at_least,
)
from dymu.commands._qwen import run_thresholds
from dymu.data import read_image_list
from dymu.encoders import inspect_encoder
from dymu.encoders import loading as encoder_loading
from dymu.encoders.hf_dinov2 import find_tower
from dymu.encoders.names import checkpoint_dir, dymu_name, is_dymu_name, parse_dymu_name
from dymu.output_lock import output_lock
from dymu.thresholds import merge_schedule

NAME = "thresholds"
HELP = "find per-layer DToMe thresholds over an image dataset (resumable, multi-process with torchrun)"
INTERRUPTED = "the batches done so far are saved: run the same command again to resume (--restart starts over)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="DyMU name, transformers folder/hub name, installed weights name (dinov2-small) or open_clip:MODEL[:PRETRAINED]",
    )
    parser.add_argument("--weights", help="with a DyMU name: load the encoder from here instead of its default")
    parser.add_argument("--data", "--json", dest="data", required=True, help="JSON list of {\"image\": \"rel/path\"}")
    parser.add_argument("--image-dir", help="folder the image paths are relative to (default: the JSON's folder)")
    add_schedule_argument(parser, default=None, help="merge schedule (default: constant, or the DyMU name's)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--r-total", type=int_at_least(0), help="tokens to merge per image over all layers")
    budget.add_argument(
        "--out-tokens", type=int_at_least(1), help="patch tokens to keep per image on average (r_total = patches - K)"
    )
    budget.add_argument(
        "--keep-percent", type=int_at_least(1), help="Qwen-VL checkpoint: share of cells kept per frame, in %% (-tome-<P>pct)"
    )
    parser.add_argument(
        "--image-size", type=int_at_least(1), default=448, help="Qwen-VL checkpoint: finding image side (default 448)"
    )
    parser.add_argument("--batch-size", type=int_at_least(1), default=32, help="global batch size (all processes together)")
    parser.add_argument("--max-images", type=int_at_least(1), help="use only the first N images of the list")
    parser.add_argument("--num-workers", type=int_at_least(0), default=2, help="image loading workers per process")
    parser.add_argument(
        "--output", "-o",
        help="checkpoint path, ending in .safetensors (default: <checkpoint folder>/<DyMU name>.safetensors)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
    parser.add_argument("--restart", action="store_true", help="ignore (delete) a resume state and start over")
    parser.add_argument("--max-batches", type=int_at_least(1), help="stop after N global batches in total (resume later)")
    parser.add_argument("--device", help="device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="model dtype")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_token_order_argument(
        parser, default="authors", help="token order after a merge while finding (recorded in the checkpoint)"
    )


def _check_output(path, overwrite: bool) -> None:
    """Refuse before any work an output dymu could not write or read back, or would not replace."""
    if path.suffix != ".safetensors":
        raise ValueError(
            f"--output {path}: dymu writes threshold checkpoints as safetensors; give a name ending in .safetensors "
            f"(e.g. {path.with_suffix('.safetensors').name})"
        )
    check_writable_file(path, "the checkpoint")
    if path.exists() and not overwrite and not finding.resume_path(path).exists():
        raise ValueError(f"{path} exists; pass --overwrite to replace it (or give another --output)")


def _input_geometry(loaded, info) -> tuple[int, int | None]:
    """(patch tokens per image, input side) as the preprocessing makes them. A DINOv2 takes any input size, so
    its config's grid (37 x 37 for DINOv2-S) says nothing about the inputs, and its DyMU names carry the side;
    other encoders have a fixed grid (side None: not part of their names)."""
    tower = find_tower(loaded.model) if info.encoder.startswith("dinov2") else None
    if tower is None:
        return info.input_tokens - int(info.protect_first), None
    patch = tower.config.patch_size
    h, w = loaded.preprocess(Image.new("RGB", (256, 256), (128, 128, 128))).shape[-2:]
    return (h // patch) * (w // patch), (int(h) if h == w else None)


def run(args: argparse.Namespace) -> int:
    # dymu.vlm imports transformers (seconds) and `dymu --help` imports every command module: imported when used
    from dymu.vlm.qwen_vl import MODEL_CLASSES as QWEN_MODEL_TYPES

    family = checkpoint_model_type(args.model)
    if family in QWEN_MODEL_TYPES:
        return run_thresholds(args, family)
    if args.keep_percent is not None:
        raise ValueError("--keep-percent is for Qwen-VL checkpoint folders; use --r-total or --out-tokens here")
    known = None  # the output, where it is known before the (possibly long) model load
    if args.output:
        known = Path(args.output)
    elif is_dymu_name(args.model) and not Path(args.model).exists():
        known = parse_dymu_name(args.model).checkpoint_path
    if known is not None:
        _check_output(known, args.overwrite)
    rank, world, device = finding.init_distributed()
    locks = ExitStack()  # one run per output: a second one is refused, not mixed into the same resume state
    try:
        if known is not None and rank == 0:
            locks.enter_context(output_lock(known))
        images = read_image_list(args.data, args.image_dir, max_images=args.max_images)
        loaded = encoder_loading.load_encoder(args.model, weights=args.weights, device=args.device or device, dtype=getattr(torch, args.dtype))
        info = inspect_encoder(loaded.model)
        patches, side = _input_geometry(loaded, info)
        schedule = args.schedule or "constant"
        if loaded.dymu is not None:
            name = loaded.dymu
            if args.schedule and schedule != name.schedule:
                raise ValueError(f"{name.name} uses the {name.schedule} schedule; drop --schedule or use another name")
            if args.r_total is not None and args.r_total != name.r_total:
                raise ValueError(f"{name.name} means r_total {name.r_total}; drop --r-total or use another name")
            if args.out_tokens is not None and args.out_tokens != name.out_tokens:
                raise ValueError(f"{name.name} means {name.out_tokens} output tokens; drop --out-tokens")
            schedule, r_total = name.schedule, name.r_total
            default_output = name.checkpoint_path
        else:
            if args.r_total is None and args.out_tokens is None:
                raise ValueError("give the budget: --r-total N or --out-tokens K (or use a DyMU name as --model)")
            r_total = args.r_total if args.r_total is not None else patches - args.out_tokens
            if not 0 <= r_total < patches:
                raise ValueError(f"r_total must be in [0, {patches}) for {info.encoder} ({patches} patch tokens), got {r_total}")
            default_output = checkpoint_dir() / f"{dymu_name(info.encoder, patches - r_total, schedule, side)}.safetensors"
            if not args.output:
                _check_output(default_output, args.overwrite)
        counts = merge_schedule(schedule, r_total, info.num_layers)
        output = Path(args.output) if args.output else default_output
        if rank == 0:
            locks.enter_context(output_lock(output))  # (re-entrant where it is held already)
        result = finding.find_thresholds(
            loaded.model,
            images,
            loaded.preprocess,
            merge_counts=counts,
            schedule=schedule,
            batch_size=args.batch_size,
            output=output,
            resume=not args.restart,
            overwrite=args.overwrite,
            num_workers=args.num_workers,
            token_order=args.token_order,
            progress=not args.quiet,
            max_batches=args.max_batches,
            model_source=loaded.source,
        )
        if rank == 0:
            duplicates = images.duplicates()
            print(_report(result, info.encoder, patches, counts, schedule, world, images.without_image, duplicates))
    finally:
        locks.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _report(
    result, encoder: str, patches: int, counts: list[int], schedule: str, world: int, without_image: int,
    duplicates: dict[str, int],
) -> str:
    lines = [
        f"encoder {encoder}: {len(counts)} layers, {schedule} schedule, r_total {sum(counts)} "
        f"(target {patches - sum(counts)} of {patches} patch tokens per image)",
        f"images seen: {result.images_seen} in {result.batches_done}/{result.num_batches} batches"
        + (f" on {world} processes" if world > 1 else "")
        + (f" (resumed after batch {result.resumed_from})" if result.resumed_from else ""),
    ]
    ckpt = result.checkpoint
    lines.append(f"inputs: {ckpt.grid}" + (f", preprocessed as '{ckpt.preprocess}'" if ckpt.preprocess else ""))
    if without_image:
        lines.append(f"records without an image key (ignored): {without_image}")
    if duplicates:
        shown = ", ".join(f"{p} x{n}" for p, n in list(duplicates.items())[:10])
        more = f", … {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        lines.append(
            f"{sum(duplicates.values()) - len(duplicates)} list entries repeat an earlier one ({len(duplicates)} "
            f"image(s) listed more than once: {shown}{more}); each entry was used, as listed"
        )
    if result.skipped:
        shown = ", ".join(f"{p} ({why})" for p, why in result.skipped[:10])
        more = f", … {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
        lines.append(f"skipped {len(result.skipped)} image(s): {shown}{more}")
    if result.readable_now:
        shown = ", ".join(result.readable_now[:10]) + (f", … {len(result.readable_now) - 10} more" if len(result.readable_now) > 10 else "")
        lines.append(
            f"{len(result.readable_now)} of them are readable now ({shown}) but were skipped in batches done before "
            "this resumed run; pass --restart to start over with them"
        )
    lines.append(f"{'layer':>5} {'r':>4} {'threshold':>10}")
    for i, (r, t) in enumerate(zip(counts, result.checkpoint.thresholds.tolist())):
        lines.append(f"{i:>5} {r:>4} {t:>10.6f}")
    if result.output is not None:
        lines.append(f"wrote {result.output}")
    else:
        lines.append("stopped before the last batch: run the same command again to resume")
    return "\n".join(lines)
