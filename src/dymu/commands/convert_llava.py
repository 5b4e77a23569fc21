"""Convert an original LLaVA-1.5 checkpoint (LlavaLlamaForCausalLM + mm_vision_tower) to the llava-hf format.

The result loads with transformers' LlavaForConditionalGeneration and with dymu.vlm.load_llava. When
mm_vision_tower names a DyMU tower (e.g. ViT-L-14-336-tome-72out) or --thresholds is given, a "dymu"
block is written into config.json so that load_llava turns DyMU on. A thresholds file (or a DyMU name's,
looked up in $DYMU_CHECKPOINT_DIR if set, else in ./checkpoints/threshold_checkpoints, then among the
checkpoints shipped with dymu) is copied into the output folder. (LLaVA-OneVision checkpoints are read in the
llava-hf format as they are: `dymu convert-onevision` writes their dymu block.)

Examples:
  dymu convert-llava checkpoints/vlm_checkpoints/llava-v1.5-7b out/llava-v1.5-7b-hf
  dymu convert-llava llava-v1.5-7b out/llava-dymu --thresholds ViT-L-14-336-tome-72out.safetensors --vtu fast
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from dymu.encoders import resolve_thresholds_path
from dymu.encoders.names import parse_dymu_name

NAME = "convert-llava"
HELP = "convert an original LLaVA-1.5 checkpoint to the llava-hf format (with a dymu config block)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="original LLaVA-1.5 folder (config.json with mm_vision_tower)")
    parser.add_argument("output", help="folder to write the llava-hf checkpoint to")
    parser.add_argument("--vision-tower", help="load the CLIP tower from here instead of mm_vision_tower")
    parser.add_argument("--thresholds", help="threshold checkpoint or DyMU name to bundle (copied into the output)")
    parser.add_argument("--vtu", choices=["fast", "exact", "off"], default="fast", help="VTU mode for the dymu block")


def run(args: argparse.Namespace) -> int:
    # dymu.vlm imports transformers (seconds) and `dymu --help` imports every command module: imported when used
    from dymu.vlm.original import convert_original_llava

    if args.thresholds is not None:  # before the (long) conversion
        args.thresholds = str(resolve_thresholds_path(args.thresholds))

    model, processor, settings = convert_original_llava(args.source, vision_tower=args.vision_tower)
    out = Path(args.output)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    thresholds = args.thresholds or (str(parse_dymu_name(settings.encoder).find_checkpoint()) if settings.encoder else None)
    if thresholds is not None:
        if not Path(thresholds).is_file():
            raise FileNotFoundError(f"threshold checkpoint not found: {thresholds}")
        shutil.copy(thresholds, out / Path(thresholds).name)
        settings.thresholds, settings.vtu = Path(thresholds).name, args.vtu
        config = json.loads((out / "config.json").read_text())
        config["dymu"] = {k: v for k, v in asdict(settings).items() if v is not None}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        print(f"wrote {out} with DyMU settings {config['dymu']}")
    else:
        print(f"wrote {out} (no DyMU settings: pass --thresholds to add them)")
    return 0
