"""Encode images with a DToMe encoder and print how many tokens each keeps.

Token counts are patch tokens (CLS excluded), as in the DyMU names ("72out" = 72 on average).
--model is a DyMU name (its thresholds are read from <checkpoint folder>/<name>.safetensors unless --thresholds
is given), a transformers folder or hub name of a CLIP / SigLIP / DINOv2 vision model, an installed weights
name (dinov2-small, see `dymu weights`), or open_clip:MODEL[:PRETRAINED]. --thresholds is a checkpoint file
(dymu .safetensors or the authors' .pth) or a DyMU name. The checkpoint folder is $DYMU_CHECKPOINT_DIR if set,
else ./checkpoints/threshold_checkpoints, and then the checkpoints shipped with dymu (the DINOv2-S ones).

Budget control on top of the stored thresholds: --threshold-offset adds a constant to every layer's threshold
(> 0 keeps more tokens, < 0 fewer); --token-budget K picks the offset that makes these images keep K tokens on
average (bisection) and prints it.

Examples:
  dymu encode --model ViT-L-14-336-tome-72out cat.jpg street.jpg
  dymu encode --model ./my-clip --thresholds ckpt.safetensors --per-layer --layer -2 cat.jpg
  dymu encode --model ViT-L-14-336-tome-72out --token-budget 150 images/*.jpg
  dymu encode --model open_clip:ViT-L-14-336:openai --thresholds ViT-L-14-336-tome-192out --json cat.jpg
  dymu weights install dinov2-small && dymu encode --model dinov2-small-224-tome-64out cat.jpg
"""

from __future__ import annotations

import argparse

NAME = "encode"
HELP = "encode images with a DToMe encoder and print the tokens each keeps"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dymu.commands._args import add_token_order_argument, int_at_least, positive_float

    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model", required=True,
        help="DyMU name, transformers folder/hub name, installed weights name (dinov2-small) or open_clip:MODEL[:PRETRAINED]",
    )
    parser.add_argument("--weights", help="with a DyMU name: load the encoder from here instead of its default")
    parser.add_argument("--thresholds", help="threshold checkpoint (.safetensors / authors' .pth) or DyMU name")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--threshold-offset", type=float, help="added to every layer's threshold (> 0: more tokens)")
    budget.add_argument(
        "--token-budget", type=positive_float, help="target average tokens per image: calibrate the offset on these images"
    )
    parser.add_argument("--layer", type=int, default=-1, help="hidden-state index to count at (LLaVA-1.5 uses -2)")
    parser.add_argument("--per-layer", action="store_true", help="also print the tokens after every layer")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="device")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_token_order_argument(parser, default=None, help="token order after a merge (default: the checkpoint's)")


def run(args: argparse.Namespace) -> int:
    import json

    import dymu
    from dymu.data import load_images
    from dymu.encoders.loading import load_encoder

    loaded = load_encoder(args.model, weights=args.weights, device=args.device)
    thresholds = args.thresholds
    if thresholds is None:
        if loaded.dymu is None:
            raise ValueError("give --thresholds (a checkpoint or DyMU name), or use a DyMU name as --model")
        thresholds = loaded.dymu.name
    pixel_values = load_images(args.images, loaded.preprocess)
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
