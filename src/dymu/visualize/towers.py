"""The patched vision towers the pictures are drawn from: the demo's random CLIP (:func:`demo_tower`) or a local
transformers CLIP/SigLIP folder (:func:`load_tower`), and the images as they see them (:func:`pixels`,
:func:`input_view`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import dymu
from dymu.data import load_image
from dymu.demo import random_clip
from dymu.encoders.names import is_dymu_name
from dymu.samples import image_set
from dymu.thresholds import merge_schedule


# ------------------------------------------------------------------------------------------ models
@dataclass
class Tower:
    """A DToMe-patched vision tower ready to encode images."""

    model: nn.Module
    processor: Any  # a transformers image processor (image_mean, image_std, __call__)
    description: str
    has_cls: bool
    patch_size: int
    image_size: int
    thresholds: list[float] = field(default_factory=list)


def demo_tower(
    *, layers: int = 6, image_size: int = 224, r_total: int = 150, schedule: str = "constant",
    calibration_images: int = 16, seed: int = 0,
) -> Tower:
    """The demo's small random CLIP ViT (``dymu demo``, :func:`dymu.demo.random_clip`), with thresholds found on
    built-in images."""
    model, processor = random_clip(layers=layers, image_size=image_size, patch_size=14, seed=seed)
    tower = Tower(model, processor, "", True, 14, image_size)
    find_and_apply_thresholds(tower, r_total=r_total, schedule=schedule, images=image_set(calibration_images, image_size))
    tower.description = (
        f"random CLIP ViT ({layers} layers, {image_size} px, patch 14); thresholds found on "
        f"{calibration_images} built-in images, r_total {r_total} ({schedule})"
    )
    return tower


def load_tower(
    path: str | Path, thresholds: str | Sequence[float] | None = None, *, r_total: int | None = None,
    schedule: str = "constant", device: str = "cpu",
) -> Tower:
    """A local transformers CLIP or SigLIP folder (full model or vision model), patched with DToMe.

    ``thresholds``: a threshold checkpoint path or per-layer floats; if None they are found on the
    built-in images with ``r_total`` merges (default: merge to 1/8 of the patches, like 72out of 576).
    """
    # why: transformers' model modules take seconds to import; loaded with a model folder only
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path} (expected a local transformers CLIP/SigLIP folder)")
    config = AutoConfig.from_pretrained(path)
    kind = config.model_type
    if kind in ("clip", "clip_vision_model"):
        model_cls, has_cls = CLIPVisionModel, True
    elif kind in ("siglip", "siglip_vision_model"):
        model_cls, has_cls = SiglipVisionModel, False
    else:
        raise ValueError(f"{path}: model_type {kind!r} is not a CLIP or SigLIP model")
    model = model_cls.from_pretrained(path, attn_implementation="sdpa").to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: no image processor config (preprocessor_config.json): {err}") from None
    vc = model.config
    tower = Tower(model, processor, f"{kind} from {path}", has_cls, vc.patch_size, vc.image_size)
    if thresholds is None:
        patches = (vc.image_size // vc.patch_size) ** 2
        r = r_total if r_total is not None else patches - patches // 8
        find_and_apply_thresholds(tower, r_total=r, schedule=schedule, images=image_set(16, vc.image_size))
        tower.description += f"; thresholds found on 16 built-in (synthetic) images, r_total {r} — pass real ones with --thresholds"
    else:
        dymu.patch(model, thresholds)
        tower.thresholds = dymu.get_state(model).thresholds.tolist()
        tower.description += f"; thresholds {thresholds if isinstance(thresholds, (str, Path)) else 'given'}"
    return tower


def find_and_apply_thresholds(tower: Tower, *, r_total: int, schedule: str, images: Sequence[Any]) -> list[float]:
    """Find thresholds on ``images`` and leave the tower patched in inference mode with them."""
    model = tower.model
    if "_dymu_state" in model.__dict__:
        dymu.unpatch(model)
    state = dymu.patch(model)
    counts = merge_schedule(schedule, r_total, state.num_layers)
    dymu.configure(model, merge_counts=counts)
    with torch.no_grad():
        model(pixel_values=pixels(tower, images))
    tower.thresholds = list(dymu.last_run(model).found_thresholds)
    dymu.configure(model, thresholds=tower.thresholds)
    return tower.thresholds


def parse_checkpoint_or_floats(value: str | None) -> str | list[float] | None:
    """``dymu visualize --thresholds``: a checkpoint path or a DyMU name (returned as given, resolved by
    :func:`dymu.patch`), or comma-separated per-layer floats (returned as a list)."""
    if value is None:
        return None
    if Path(value).exists() or is_dymu_name(value):
        return value
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise FileNotFoundError(
            f"--thresholds: no such checkpoint, not a DyMU name and not a comma-separated list of floats: {value}"
        ) from None


def pixels(tower: Tower, images: Sequence[Any]) -> torch.Tensor:
    param = next(tower.model.parameters())
    values = tower.processor(images=[load_image(i) for i in images], return_tensors="pt").pixel_values
    return values.to(param.device, param.dtype)


def input_view(tower: Tower, pixel_values: torch.Tensor) -> np.ndarray:
    """``[B, H, W, 3]`` uint8: the images exactly as the model sees them (normalisation undone)."""
    mean = torch.tensor(tower.processor.image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(tower.processor.image_std, dtype=torch.float32)[None, :, None, None]
    rgb = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
