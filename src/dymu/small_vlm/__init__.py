"""A small real LLaVA-1.5-style VLM from the real parts: DINOv2-S/14 + ``mlp2x_gelu`` + SmolLM2-135M-Instruct.

* :mod:`dymu.small_vlm.model` – the stock ``LlavaForConditionalGeneration`` and ``LlavaProcessor`` it is built as
  (:func:`build_small_vlm`), the trained projector it loads and the threshold sets shipped with it
  (``dymu/small_vlm_checkpoint/``, package data);
* :mod:`dymu.small_vlm.lora` – LoRA adapters on its language model, and their merge on load;
* :mod:`dymu.small_vlm.training_data` – easy-VQA / complexity-VQA images as chat conversations, cached features;
* :mod:`dymu.small_vlm.training` – resumable projector (+ LoRA) training over a :class:`TrainConfig`
  (``dymu train-projector`` is its command).
"""

from __future__ import annotations

from dymu.small_vlm.lora import LORA_PREFIX, lora_targets
from dymu.small_vlm.model import (
    CHAT_TEMPLATE,
    CHECKPOINT_DIR,
    DEFAULT_CHECKPOINT,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    MIX_THRESHOLD_DIR,
    NUM_IMAGE_TOKENS,
    PATCH_SIZE,
    PROMPT_SUFFIX_KEY,
    SYSTEM_PROMPT,
    THRESHOLD_DIR,
    VISION_FEATURE_LAYER,
    build_config,
    build_processor,
    build_small_vlm,
    load_trained,
    projector_path,
    prompt_suffix_of,
    threshold_path,
    threshold_sets,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CHECKPOINT_DIR",
    "DEFAULT_CHECKPOINT",
    "IMAGE_SIZE",
    "IMAGE_TOKEN",
    "LORA_PREFIX",
    "MIX_THRESHOLD_DIR",
    "NUM_IMAGE_TOKENS",
    "PATCH_SIZE",
    "PROMPT_SUFFIX_KEY",
    "SYSTEM_PROMPT",
    "THRESHOLD_DIR",
    "VISION_FEATURE_LAYER",
    "build_config",
    "build_processor",
    "build_small_vlm",
    "load_trained",
    "lora_targets",
    "projector_path",
    "prompt_suffix_of",
    "threshold_path",
    "threshold_sets",
]
