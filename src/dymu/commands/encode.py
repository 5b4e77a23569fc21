"""Encode images with a DToMe encoder and print how many tokens each keeps.

Token counts are patch tokens (CLS excluded), as in the DyMU names ("72out" = 72 on average).
--model is a DyMU name (its thresholds are read from <checkpoint folder>/<name>.safetensors unless --thresholds
is given), a transformers folder or hub name of a CLIP / SigLIP / DINOv2 vision model, an installed weights
name (dinov2-small, see `dymu weights`), or open_clip:MODEL[:PRETRAINED]. --thresholds is a checkpoint file
(dymu .safetensors or the authors' .pth) or a DyMU name. The checkpoint folder is $DYMU_CHECKPOINT_DIR if set,
else ./checkpoints/threshold_checkpoints, then the checkpoints shipped with dymu (the DINOv2-S ones), then (the
authors' encoders) the authors' hub repository ($DYMU_HUB_REPO, default mikewang/DyMU; file layout
$DYMU_HUB_FILES), cached by huggingface_hub (HF_HUB_OFFLINE=1: the cache only).

Budget control on top of the stored thresholds: --threshold-offset adds a constant to every layer's threshold
(> 0 keeps more tokens, < 0 fewer); --token-budget K picks the offset that makes these images keep K tokens on
average (bisection) and prints it.

A LLaVA-OneVision checkpoint folder (llava-hf format) as --model encodes each image as the model does: its base
crop and anyres tiles in one DToMe batch; it prints the tokens kept per crop and the visual tokens the LLM
receives per image (merged tokens + row newlines) next to the stock count. Its thresholds come from --thresholds
or the folder's "dymu" config block; --token-budget then counts tokens per crop (the K of
siglip-so400m-patch14-384-<K>out), and --layer defaults to the model's vision_feature_layer.

A Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder as --model runs each image through its own image processor
(dynamic resolution) and DToMe tower with --thresholds (a -tome-<P>pct checkpoint) and prints the visual tokens
kept per image next to the stock count.

Examples:
  dymu encode --model ViT-L-14-336-tome-72out cat.jpg street.jpg
  dymu encode --model ./my-clip --thresholds ckpt.safetensors --per-layer --layer -2 cat.jpg
  dymu encode --model ViT-L-14-336-tome-72out --token-budget 150 images/*.jpg
  dymu encode --model open_clip:ViT-L-14-336:openai --thresholds ViT-L-14-336-tome-192out --json cat.jpg
  dymu weights install dinov2-small && dymu encode --model dinov2-small-224-tome-64out cat.jpg
  dymu encode --model llava-onevision-qwen2-7b-si-hf --thresholds siglip-so400m-patch14-384-256out cat.jpg
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import dymu
from dymu.commands._args import add_token_order_argument, checkpoint_model_type, int_at_least, positive_float
from dymu.commands._qwen import run_encode
from dymu.data import describe_preprocess, load_image
from dymu.encoders import loading as encoder_loading
from dymu.encoders.names import is_dymu_name, parse_dymu_name
from dymu.encoders.patching import resolve_thresholds_path
from dymu.thresholds import load_thresholds

NAME = "encode"
HELP = "encode images with a DToMe encoder and print the tokens each keeps"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model", required=True,
        help="DyMU name, transformers folder/hub name, installed weights name (dinov2-small), open_clip:MODEL[:PRETRAINED] "
        "or a LLaVA-OneVision checkpoint folder",
    )
    parser.add_argument("--weights", help="with a DyMU name: load the encoder from here instead of its default")
    parser.add_argument("--thresholds", help="threshold checkpoint (.safetensors / authors' .pth) or DyMU name")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--threshold-offset", type=float, help="added to every layer's threshold (> 0: more tokens)")
    budget.add_argument(
        "--token-budget", type=positive_float, help="target average tokens per image: calibrate the offset on these images"
    )
    parser.add_argument(
        "--layer", type=int,
        help="hidden-state index to count at (default -1; LLaVA-1.5 uses -2; OneVision: its vision_feature_layer)",
    )
    parser.add_argument("--per-layer", action="store_true", help="also print the tokens after every layer")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="device")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_token_order_argument(parser, default=None, help="token order after a merge (default: the checkpoint's)")


def run(args: argparse.Namespace) -> int:
    # dymu.vlm imports transformers (seconds) and `dymu --help` imports every command module: imported when used
    from dymu.vlm.qwen_vl import MODEL_CLASSES as QWEN_MODEL_TYPES

    if checkpoint_model_type(args.model) == "llava_onevision":
        return run_onevision(args)
    if checkpoint_model_type(args.model) in QWEN_MODEL_TYPES:
        return run_encode(args)
    if args.layer is None:
        args.layer = -1
    # every check that needs no model comes before its load: images, thresholds (and the input side a DyMU name
    # fixes: another grid is refused here)
    pil = [load_image(p) for p in args.images]
    thresholds = _checkpoint_for(args)
    if thresholds is None:
        raise ValueError("give --thresholds (a checkpoint or DyMU name), or use a DyMU name as --model")
    dtype = getattr(torch, args.dtype)
    loaded = encoder_loading.load_encoder(args.model, weights=args.weights, device=args.device, dtype=dtype)
    thresholds.check(input_size=loaded.image_size)
    _warn_preprocess(thresholds, loaded.preprocess)
    pixel_values = torch.stack([loaded.preprocess(img) for img in pil]).to(dtype)
    model = loaded.model
    state = dymu.patch(model, thresholds, threshold_offset=args.threshold_offset or 0.0, token_order=args.token_order)
    calibration = None
    if args.token_budget is not None:
        calibration = dymu.calibrate_budget(model, pixel_values, args.token_budget, layer=args.layer, batch_size=args.batch_size)
    protected = int(state.protect_first)
    finals, per_layer = [], []
    for chunk in pixel_values.split(args.batch_size):
        enc = dymu.encode(model, chunk, layer=args.layer, stop_early=not args.per_layer)
        finals += [n - protected for n in enc.mask.sum(1).tolist()]
        per_layer += (enc.tokens_per_layer - protected).T.tolist()
    patches = state.input_tokens - protected
    if args.json:
        out = {
            "encoder": state.encoder,
            "layer": enc.layer,
            "patch_tokens": patches,
            "threshold_offset": state.threshold_offset,
            "images": [
                {"path": path, "tokens": n, **({"tokens_per_layer": layers} if args.per_layer else {})}
                for path, n, layers in zip(args.images, finals, per_layer)
            ],
            "mean_tokens": sum(finals) / len(finals),
        }
        if calibration is not None:
            out["token_budget"] = args.token_budget
        print(json.dumps(out, indent=2))
        return 0
    if calibration is not None:
        print(
            f"threshold offset {calibration.offset:+.6f}: {calibration.mean_tokens:.1f} tokens per image on average "
            f"(target {args.token_budget:g}, {calibration.evaluations} passes)"
        )
        if abs(calibration.mean_tokens - args.token_budget) > 0.5:
            print(f"note: the target {args.token_budget:g} cannot be reached on these images; the nearest is "
                  f"{calibration.mean_tokens:.1f} (token counts are whole numbers per image)")
    elif state.threshold_offset:
        print(f"threshold offset {state.threshold_offset:+.6f}")
    width = max(len(p) for p in args.images)
    print(f"{'image':<{width}}  tokens (of {patches} at hidden-state index {enc.layer})")
    for path, n, layers in zip(args.images, finals, per_layer):
        line = f"{path:<{width}}  {n:>6}"
        if args.per_layer:
            line += "   per layer: " + " ".join(str(c) for c in layers)
        print(line)
    print(f"{'mean':<{width}}  {sum(finals) / len(finals):>8.1f}")
    return 0


def _checkpoint_for(args: argparse.Namespace):
    """The threshold checkpoint of ``--thresholds`` (or of the DyMU name in ``--model``), checked against the
    input side a DINOv2 DyMU name fixes; None when neither names one."""
    name = parse_dymu_name(args.model) if is_dymu_name(args.model) and not Path(args.model).exists() else None
    if args.weights is not None and name is None:
        raise ValueError("--weights is only used with a DyMU name as --model")
    source = args.thresholds or (name.name if name is not None else None)
    if source is None:
        return None
    return load_thresholds(resolve_thresholds_path(source), input_size=name.base.image_size if name else None)


def _warn_preprocess(ckpt, transform) -> None:
    """Warn when the checkpoint records another preprocessing than ``transform`` (both known): the token grid is
    the same, but other pixels give other counts than the thresholds were found for."""
    now = describe_preprocess(transform)
    if ckpt.preprocess and now and ckpt.preprocess != now:
        warnings.warn(f"the thresholds were found on images preprocessed as '{ckpt.preprocess}', these are '{now}': "
                      "token counts will differ from what they were found for", stacklevel=2)


def run_onevision(args: argparse.Namespace) -> int:
    """``dymu encode`` on a LLaVA-OneVision folder: tokens per crop, and per image those the LLM receives."""
    from dymu.vlm import load_onevision  # heavy, as in run()
    from dymu.vlm.base import vlm_state
    from dymu.vlm.checkpoints import read_config
    from dymu.vlm.onevision import calibrate_token_budget, encode_images, stock_visual_tokens
    from dymu.vlm.settings import settings_block

    if args.thresholds is None and settings_block(read_config(args.model)) is None:
        raise ValueError(f"give --thresholds (a checkpoint or DyMU name): {args.model} has no dymu config block")
    if args.weights is not None:
        raise ValueError("--weights is only used with a DyMU name as --model (a OneVision folder holds its tower)")
    if args.per_layer:
        raise ValueError("--per-layer is not available for a LLaVA-OneVision checkpoint (give its vision tower instead)")
    pil = [load_image(p) for p in args.images]  # before the model load
    if args.thresholds is not None:
        resolve_thresholds_path(args.thresholds)
    model, processor = load_onevision(
        args.model, thresholds=args.thresholds, threshold_offset=args.threshold_offset, dymu=True,
        torch_dtype=getattr(torch, args.dtype),
    )
    model.to(args.device)
    tower = model.model.vision_tower
    state = dymu.get_state(tower)
    if state.mode != "infer":
        raise ValueError(f"give --thresholds (a checkpoint or DyMU name): {args.model}'s dymu block names none")
    if args.token_order is not None:
        dymu.configure(tower, token_order=args.token_order)
    calibration = None
    if args.token_budget is not None:
        calibration = calibrate_token_budget(model, processor, pil, args.token_budget)
    layer = model.config.vision_feature_layer if args.layer is None else args.layer
    downsample = vlm_state(model).options["downsample"]
    per_crop, visual, stock = [], [], []
    for start in range(0, len(pil), args.batch_size):
        chunk = processor.image_processor(pil[start : start + args.batch_size], return_tensors="pt")
        pixel_values = chunk["pixel_values"].to(args.device, model.dtype)
        enc = encode_images(model, pixel_values, chunk["image_sizes"], vision_feature_layer=layer, downsample=downsample)
        per_crop += enc.crop_counts
        visual += [int(f.shape[0]) for f in enc.features]
        stock += stock_visual_tokens(model, chunk["image_sizes"])
    patches = state.input_tokens
    crops = [c for counts in per_crop for c in counts]
    crop_mean = sum(crops) / len(crops)
    if args.json:
        out = {
            "model": str(args.model),
            "encoder": state.encoder,
            "layer": layer,
            "patch_tokens_per_crop": patches,
            "threshold_offset": state.threshold_offset,
            "images": [
                {"path": path, "crops": len(c), "tokens_per_crop": c, "visual_tokens": v, "stock_visual_tokens": s}
                for path, c, v, s in zip(args.images, per_crop, visual, stock)
            ],
            "mean_tokens_per_crop": crop_mean,
            "mean_visual_tokens": sum(visual) / len(visual),
        }
        if calibration is not None:
            out["token_budget"] = args.token_budget
        print(json.dumps(out, indent=2))
        return 0
    if calibration is not None:
        print(f"threshold offset {calibration:+.6f} for {args.token_budget:g} tokens per crop on average")
    elif state.threshold_offset:
        print(f"threshold offset {state.threshold_offset:+.6f}")
    width = max(len(p) for p in args.images)
    print(
        f"{'image':<{width}}  {'crops':>5}  {'visual tokens (stock)':>21}  tokens per crop: base, tiles "
        f"(of {patches} at hidden-state index {layer})"
    )
    for path, c, v, s in zip(args.images, per_crop, visual, stock):
        print(f"{path:<{width}}  {len(c):>5}  {f'{v} ({s})':>21}  {' '.join(str(n) for n in c)}")
    means = f"{sum(visual) / len(visual):.1f} ({sum(stock) / len(stock):.1f})"
    print(f"{'mean':<{width}}  {len(crops) / len(per_crop):>5.1f}  {means:>21}  {crop_mean:.1f} per crop")
    return 0
