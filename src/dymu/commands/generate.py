"""Answer a question about an image with LLaVA-1.5 or LLaVA-OneVision + DyMU and report the visual tokens kept.

MODEL is a llava-hf LLaVA-1.5 or LLaVA-OneVision folder or hub name (as from_pretrained takes it: the Hugging
Face cache, HF_HUB_OFFLINE=1 for the cache only; a "dymu" block in its config.json turns DyMU on;
`dymu convert-onevision` writes one into a OneVision checkpoint) or an original LLaVA-1.5 folder
(mm_vision_tower naming a DyMU tower such as ViT-L-14-336-tome-72out turns DyMU on). --thresholds turns it on
for any checkpoint. A DyMU name's thresholds are looked up in $DYMU_CHECKPOINT_DIR if set, else in
./checkpoints/threshold_checkpoints, then among dymu's own, then (the authors' encoders) in the authors' hub
repository ($DYMU_HUB_REPO, default mikewang/DyMU; file layout $DYMU_HUB_FILES, see docs/encoders.md). For OneVision the visual tokens of an image are
what the LLM receives (merged tokens of the base crop and its anyres tiles, plus the row newlines), next to
the stock count, and --token-budget counts tokens per crop (the K of siglip-so400m-patch14-384-<K>out).

Each prompt goes into the chat template with its image in front; a prompt that holds one <image> places
the image there instead (no second one is added). The images and --thresholds are checked before the model
loads; a prompt longer than the language model's context (max_position_embeddings, image placeholders
counted at the stock count) is refused with the numbers.

Examples:
  dymu generate --model llava-hf/llava-1.5-7b-hf --thresholds checkpoints/threshold_checkpoints/ViT-L-14-336-tome-72out.safetensors \\
      --image cat.jpg --prompt "What is in the picture?"
  dymu generate --model checkpoints/vlm_checkpoints/llava-v1.5-7b --image a.jpg --image b.jpg \\
      --prompt "Describe it." --vtu exact
  dymu generate --model llava-onevision-qwen2-7b-si-hf --thresholds siglip-so400m-patch14-384-256out \\
      --image cat.jpg --prompt "What is in the picture?"
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dymu.commands import _args
from dymu.commands._args import add_method_argument, int_at_least, positive_float
from dymu.data import load_image
from dymu.encoders.patching import resolve_thresholds_path
from dymu.prompt_length import check_context

NAME = "generate"
HELP = "answer a question about an image with LLaVA-1.5 or LLaVA-OneVision + DyMU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="llava-hf LLaVA-1.5 / LLaVA-OneVision or original LLaVA-1.5 checkpoint: a folder or a hub name",
    )
    parser.add_argument("--image", action="append", required=True, help="image file; repeat for a batch")
    parser.add_argument(
        "--prompt", action="append", required=True,
        help="question; one for all images or one per --image (an <image> in it places the image)",
    )
    parser.add_argument("--thresholds", help="threshold checkpoint (.safetensors, or the authors' .pth) or DyMU name")
    parser.add_argument("--vtu", choices=["fast", "exact", "off"], help="virtual token unmerging (default: config's, else fast)")
    parser.add_argument(
        "--threshold-offset", type=float, help="added to every threshold: > 0 keeps more visual tokens, < 0 fewer"
    )
    parser.add_argument(
        "--token-budget", type=positive_float,
        help="target mean visual tokens per image (OneVision: per crop), calibrated on the given images; needs thresholds "
        "(--method tome/prune/random: exactly K tokens per image)",
    )
    add_method_argument(parser)
    parser.add_argument("--no-dymu", action="store_true", help="run the stock model (for comparison)")
    parser.add_argument(
        "--vision-tower", help="where to load an original checkpoint's CLIP tower from, a folder or hub name (overrides mm_vision_tower)"
    )
    parser.add_argument(
        "--downsample", choices=["nearest", "error"],
        help="OneVision: images the stock model downsamples (past anyres_max_N); default: config's, else nearest",
    )
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=64, help="tokens to generate per answer")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda")


IMAGE_TOKEN = "<image>"


def check_prompts(prompts: list[str]) -> list[bool]:
    """Whether each prompt places its image itself (holds one <image>); ValueError for more than one."""
    placed = []
    for prompt in prompts:
        n = prompt.count(IMAGE_TOKEN)
        if n > 1:
            raise ValueError(
                f"--prompt {prompt!r} holds {n} {IMAGE_TOKEN} tokens, but each prompt goes with one --image: "
                f"write at most one {IMAGE_TOKEN} (where the image goes), or none to put it first"
            )
        placed.append(n == 1)
    return placed


def run(args: argparse.Namespace) -> int:
    images, prompts = args.image, args.prompt
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, or one per --image")
    placed = check_prompts(prompts)
    if args.no_dymu:
        given = [o for o, v in (("--thresholds", args.thresholds), ("--token-budget", args.token_budget),
                                ("--threshold-offset", args.threshold_offset)) if v is not None]
        if given:
            raise ValueError(f"--no-dymu runs the stock model without merging: drop {' and '.join(given)}")
    # checks that need no model, before its (long) load: the images, and --thresholds (a path or a DyMU name)
    pil = [load_image(i) for i in images]
    if args.thresholds is not None:
        resolve_thresholds_path(args.thresholds)
    model, processor = _args.load_vlm_from_args(args)
    onevision = _is_onevision(model)
    if args.token_budget is not None and args.method == "dymu":
        # dymu.vlm imports transformers (seconds) and `dymu --help` imports every command module: imported here
        from dymu.vlm.base import calibrate_token_budget, vision_tower

        state = getattr(vision_tower(model), "_dymu_state", None)
        if state is None or state.mode != "infer":
            raise ValueError(
                "--token-budget needs --thresholds (a threshold checkpoint or DyMU name), or a checkpoint whose "
                f"config.json has a dymu block; {args.model} has none"
            )
        offset = calibrate_token_budget(model, processor, pil, args.token_budget)
        unit = "per crop" if onevision else "per image"
        print(f"threshold offset for {args.token_budget:g} visual tokens {unit}: {offset:+.4f}")
    results, stock, crop_counts = _answer_placed(model, processor, pil, prompts, placed,
                                                 max_new_tokens=args.max_new_tokens)
    for image, result, full in zip(images, results, stock):
        of = f" of {full}" if onevision else ""
        print(f"[{image}] ({result.visual_tokens}{of} visual tokens) {result.text}")
    counts = [r.visual_tokens for r in results]
    std = statistics.stdev(counts) if len(counts) > 1 else 0.0
    print(f"visual tokens per image: {statistics.mean(counts):.1f} ± {std:.1f}")
    if crop_counts is not None:
        for image, crops in zip(images, crop_counts):
            print(f"[{image}] tokens per crop (base, then tiles): {' '.join(map(str, crops))}")
    return 0


def _is_onevision(model) -> bool:
    from transformers import LlavaOnevisionForConditionalGeneration  # heavy, as dymu.vlm in run()

    return isinstance(model, LlavaOnevisionForConditionalGeneration)


def _answer_placed(model, processor, images, prompts, placed, *, max_new_tokens: int):
    """:func:`dymu.vlm.answer`, except that a prompt holding <image> is the whole user message (its <image> is
    where the image goes) instead of being put after an image part. Returns the answers, per image the visual
    tokens the stock model would give the LLM, and per image its tokens per crop (None: one crop per image)."""
    from dymu.vlm.base import family_of, generate_with_counts  # heavy, as in run()
    from dymu.vlm.llava import Answer

    pil = list(images)  # PIL images, read before the model load
    texts = []
    for prompt, own in zip(prompts, placed):
        content = [{"type": "text", "text": prompt}]
        if not own:
            content.insert(0, {"type": "image"})
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=pil, text=texts, return_tensors="pt", padding=True).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    check_context(model, inputs)
    with torch.no_grad():
        out, tokens = generate_with_counts(model, inputs, max_new_tokens=max_new_tokens, do_sample=False)
    decoded = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    stock = family_of(model).stock_counts(model, inputs) if "pixel_values" in inputs else []
    return [Answer(text.strip(), c) for text, c in zip(decoded, tokens.counts)], stock, tokens.crop_counts
