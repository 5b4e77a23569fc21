"""Write a "dymu" config block into a LLaVA-OneVision checkpoint (llava-hf format), so that it loads with DyMU on.

SOURCE is a llava-hf LLaVA-OneVision folder or hub name (model_type llava_onevision, e.g.
llava-hf/llava-onevision-qwen2-7b-si-hf); its files are copied to OUTPUT (OUTPUT = SOURCE updates it in place).
The weights need no conversion: dymu runs on transformers' own LlavaOnevisionForConditionalGeneration. The
threshold checkpoint (a file, or a DyMU name such as siglip-so400m-patch14-384-256out, looked up in
$DYMU_CHECKPOINT_DIR if set, else in ./checkpoints/threshold_checkpoints, then among dymu's own) is checked
against the checkpoint's SigLIP tower and copied into OUTPUT; config.json gets
"dymu": {"thresholds": FILE, "vtu": ..., "threshold_offset": ..., ["encoder": NAME], ["downsample": ...]}.
dymu.vlm.load / load_onevision, `dymu generate`, `dymu encode` and lmms-eval's --model dymu_llava_onevision
then turn DyMU on from it.

(A sibling of convert-llava rather than a mode of it: convert-llava rewrites an original LLaVA-1.5 checkpoint
into the llava-hf format; a OneVision checkpoint dymu reads is already in that format, so only the block is
written, with OneVision's own options.)

Examples:
  dymu convert-onevision llava-hf/llava-onevision-qwen2-7b-si-hf out/ov-dymu-256 --thresholds siglip-so400m-patch14-384-256out
  dymu convert-onevision out/ov-dymu-256 out/ov-dymu-256 --thresholds ov.safetensors --vtu exact --downsample error
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dymu.encoders import resolve_thresholds_path
from dymu.encoders.names import encoder_identity, is_dymu_name
from dymu.evaluation import resolve_pretrained
from dymu.thresholds import load_thresholds

NAME = "convert-onevision"
HELP = "write a dymu config block (and thresholds) into a LLaVA-OneVision checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="llava-hf LLaVA-OneVision folder or hub name")
    parser.add_argument("output", help="folder to write the checkpoint to (the source itself: update it in place)")
    parser.add_argument(
        "--thresholds", required=True, help="threshold checkpoint or DyMU name to bundle (copied into the output)"
    )
    parser.add_argument("--vtu", choices=["fast", "exact", "off"], default="fast", help="VTU mode for the dymu block")
    parser.add_argument(
        "--threshold-offset", type=float, default=0.0, help="added to every threshold (> 0 keeps more visual tokens)"
    )
    parser.add_argument(
        "--downsample", choices=["nearest", "error"],
        help="images the stock model downsamples (past anyres_max_N); default when loading: nearest",
    )


def check_thresholds_fit(config: dict, thresholds: str) -> None:
    """Refuse, before anything is written, thresholds for another encoder or another number of tower blocks."""
    vision = config.get("vision_config") or {}
    try:
        identity = encoder_identity("siglip", vision["image_size"], vision["patch_size"], vision["hidden_size"])
    except KeyError as missing:
        raise ValueError(f"config.json's vision_config lacks {missing}: not a LLaVA-OneVision checkpoint") from None
    layers = vision.get("num_hidden_layers")
    try:
        load_thresholds(thresholds, encoder=identity, num_layers=layers)
    except ValueError as err:
        raise ValueError(f"{thresholds} does not fit this checkpoint's SigLIP tower: {err}") from None


def run(args: argparse.Namespace) -> int:
    # dymu.vlm imports transformers (seconds) and `dymu --help` imports every command module: imported when used
    from dymu.vlm.checkpoints import is_onevision, read_config
    from dymu.vlm.settings import ConfigBlock

    thresholds = resolve_thresholds_path(args.thresholds)
    if Path(args.source).is_dir():
        source = Path(args.source)
    elif Path(args.source).exists() or args.source.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder not found: {args.source} (nor is it a hub name 'org/model')")
    else:
        source = resolve_pretrained(args.source)
    config = read_config(source)
    if not is_onevision(config):
        hint = "; for LLaVA-1.5 use dymu convert-llava" if "mm_vision_tower" in config or config.get("model_type") == "llava" else ""
        raise ValueError(
            f"{args.source} is not a llava-hf LLaVA-OneVision checkpoint (model_type {config.get('model_type')!r}, "
            f"expected 'llava_onevision'){hint}"
        )
    check_thresholds_fit(config, str(thresholds))
    out = Path(args.output)
    in_place = out.exists() and out.resolve() == source.resolve()
    if not in_place:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an empty folder: choose another output (or SOURCE itself)")
        shutil.copytree(source, out, dirs_exist_ok=True)
    target = out / thresholds.name
    if not (target.exists() and target.resolve() == thresholds.resolve()):
        shutil.copy(thresholds, target)
    block: dict = {}
    if is_dymu_name(str(args.thresholds)) and not Path(args.thresholds).is_file():
        block["encoder"] = str(args.thresholds)
    block.update(thresholds=thresholds.name, vtu=args.vtu, threshold_offset=args.threshold_offset)
    if args.downsample is not None:
        block["downsample"] = args.downsample
    ConfigBlock.from_dict(block, family="onevision")  # what loading will check
    config["dymu"] = block
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out} with DyMU settings {block}")
    return 0
