"""What defines one training run of the small VLM (:class:`TrainConfig`) and the settings a resumed run must match."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_WORK_DIR = Path.home() / ".cache" / "dymu" / "small_vlm_run"


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The fields up to ``seed`` (and ``bf16``, ``whiten``, the mix and ``init`` when set) define
    it: a resumed run must match them (:func:`settings_of`); the others say how and where it runs."""

    images: int = 800  # train images used (the first N easy-VQA image ids)
    turns: int = 0  # questions per conversation (0: all of the image's)
    batch: int = 4  # conversations per optimiser step
    steps: int = 500  # optimiser steps planned (the lr schedule's length)
    lr: float = 1e-3  # peak learning rate (projector)
    lora_lr: float = 5e-4  # peak learning rate (LoRA)
    warmup: int = 20  # linear warm-up steps
    lora_rank: int = 0  # LoRA rank on the LLM (0: projector only)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # LLM linear layers that get LoRA
    seed: int = 0  # data order, initialisation
    whiten: bool = True  # initialise the projector's first layer to standardise the features (whiten_projector)
    bf16: bool = False  # bfloat16 autocast for the frozen LLM's matmuls
    mix: int = 0  # generated complexity-VQA images added to the easy-VQA ones
    mix_seed: int = 1000  # generator seed of the mix images
    mix_questions: int = 8  # questions generated per mix image
    init: str | None = None  # start from this projector.safetensors ('default': the shipped one)
    max_minutes: float = 0.0  # stop (and save) after this long; 0: no limit
    stop_after: int = 0  # stop (and save) after this step; 0: no limit
    checkpoint_minutes: float = 3.0  # state checkpoint interval
    work_dir: Path | None = None  # feature cache, state checkpoint, loss log (None: DEFAULT_WORK_DIR)
    restart: bool = False  # ignore an existing state checkpoint
    device: str = "cpu"
    threads: int = 0  # torch CPU threads (0: torch's default)
    progress: bool = True  # progress bars


def settings_of(config: TrainConfig) -> dict[str, Any]:
    """The settings that define a run (a resumed run must match them; ``state.pt`` stores them)."""
    settings: dict[str, Any] = {
        "images": config.images, "turns": config.turns, "batch": config.batch, "steps": config.steps,
        "lr": config.lr, "lora_lr": config.lora_lr, "warmup": config.warmup, "lora_rank": config.lora_rank,
        "lora_targets": ",".join(config.lora_targets), "seed": config.seed,
    }
    for flag in ("bf16", "whiten"):  # only written when on, so earlier runs keep their settings
        if getattr(config, flag):
            settings[flag] = True
    if config.mix:
        settings.update(mix=config.mix, mix_seed=config.mix_seed, mix_questions=config.mix_questions)
    if config.init:
        settings["init"] = config.init
    return settings
