"""Train the small real VLM's projector (and optional LoRA adapters) on easy-VQA, vision tower and LLM frozen.

The model is :func:`dymu.small_vlm.build_small_vlm` (DINOv2-S/14 + mlp2x_gelu + SmolLM2-135M-Instruct). Each
training sample is one train image with its questions as one multi-turn chat conversation (the processor's chat
template; the image in the first user turn); the loss is the cross-entropy of the answers (answer word(s) and the
closing ``<|im_end|>``) only, and the LM head runs only at those positions. DINOv2 features of the chosen train
images are computed once and cached (``--work-dir``/features-*.pt). A state checkpoint (trainable weights,
optimizer, RNG states, data position) is written every ``--checkpoint-minutes`` and at the end; a rerun with the
same ``--work-dir`` resumes exactly where it stopped (``--restart`` starts over). The result is written to
``--out`` as ``projector.safetensors`` (projector + LoRA deltas) and ``train_settings.json``.

``--mix N`` adds N generated complexity-VQA images (:mod:`dymu.complexity_vqa`, seed ``--mix-seed``, up to
``--mix-questions`` questions each) to the easy-VQA images: one shuffled pool, one conversation per image.
``--init FILE`` starts from a trained projector (+ LoRA of the same rank) instead of the whitened initialisation.

Example:
  dymu train-projector --images 800 --steps 600 --max-minutes 60 --out checkpoints/small_vlm
  dymu train-projector --images 2000 --mix 3000 --init default --lora-rank 8 --bf16 --out checkpoints/small_vlm_mix
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path
from typing import Any

from dymu.small_vlm.config import TrainConfig

NAME = "train-projector"
HELP = "train the small real VLM's projector (DINOv2-S + SmolLM2-135M) on easy-VQA (+ generated scenes: --mix), resumable"

DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=DEFAULTS.images,
                        help="train images used (the first N image ids)")
    parser.add_argument("--turns", type=int, default=DEFAULTS.turns,
                        help="questions per conversation (0: all of the image's)")
    parser.add_argument("--batch", type=int, default=DEFAULTS.batch, help="conversations per optimiser step")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps,
                        help="optimiser steps planned (the lr schedule's length)")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate (projector)")
    parser.add_argument("--lora-lr", type=float, default=DEFAULTS.lora_lr, help="peak learning rate (LoRA)")
    parser.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help="linear warm-up steps")
    parser.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank,
                        help="LoRA rank on the LLM (0: projector only)")
    parser.add_argument("--lora-targets", default=",".join(DEFAULTS.lora_targets),
                        help="LLM linear layers that get LoRA")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (data order, initialisation)")
    parser.add_argument("--max-minutes", type=float, default=DEFAULTS.max_minutes,
                        help="stop (and save) after this long; 0: no limit")
    parser.add_argument("--stop-after", type=int, default=DEFAULTS.stop_after,
                        help="stop (and save) after this step; 0: no limit")
    parser.add_argument("--checkpoint-minutes", type=float, default=DEFAULTS.checkpoint_minutes,
                        help="state checkpoint interval")
    parser.add_argument("--work-dir", default=None, help="feature cache, state checkpoint and loss log "
                        "(default ~/.cache/dymu/small_vlm_run)")
    parser.add_argument("--out", default=None, help="write projector.safetensors and train_settings.json here")
    parser.add_argument("--restart", action="store_true", help="ignore an existing state checkpoint")
    parser.add_argument("--device", default=DEFAULTS.device, help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-whiten", dest="whiten", action="store_false",
                        help="keep the projector's default initialisation (by default its first layer is initialised "
                        "to standardise the DINOv2 features per channel: their norm is ~43 while the image-to-image "
                        "variation that carries colour is ~0.75 per channel)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the frozen LLM's matmuls "
                        "(weights, optimizer and loss stay fp32; ~2x faster on CPUs with AMX/AVX512-BF16)")
    parser.add_argument("--mix", type=int, default=DEFAULTS.mix,
                        help="generated complexity-VQA images added to the easy-VQA "
                        "ones (dymu.complexity_vqa; 0: easy-VQA only)")
    parser.add_argument("--mix-seed", type=int, default=DEFAULTS.mix_seed,
                        help="generator seed of the --mix images (keep it "
                        "away from the seeds test sets are drawn from)")
    parser.add_argument("--mix-questions", type=int, default=DEFAULTS.mix_questions,
                        help="questions generated per --mix image")
    parser.add_argument("--init", default=None, help="start from this projector.safetensors (projector + LoRA of "
                        "the same rank; 'default': the shipped small VLM's) instead of the whitened initialisation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed flags describe (flag ``--x-y`` is field ``x_y``)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(lora_targets=tuple(args.lora_targets.split(",")), progress=not args.no_progress,
                  work_dir=Path(args.work_dir) if args.work_dir else None)
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    # why: `dymu --help` imports every command module; the training stack loads only when one runs
    from dymu.small_vlm.training import train

    trainer = train(config_from_args(args))
    print(f"stopped ({trainer.stop_reason}) at step {trainer.step_index}/{args.steps}, "
          f"{trainer.elapsed / 60:.1f} min of training", flush=True)
    if args.out:
        trainer.export(Path(args.out), trainer.summary())
        print(f"wrote {args.out}/projector.safetensors", flush=True)
    return 0


# the names this module held before dymu.small_vlm, importable from here as before (loaded on first use)
_MOVED = {
    "settings_of": "dymu.small_vlm.config", "add_lora": "dymu.small_vlm.lora",
    **dict.fromkeys(("Trainer", "train", "whiten_projector"), "dymu.small_vlm.training"),
    **dict.fromkeys(("IGNORE", "MIX_ID_OFFSET", "cached_features", "complexity_vqa_by_image", "conversation_ids",
                     "easy_vqa_by_image", "image_features"), "dymu.small_vlm.training_data"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
