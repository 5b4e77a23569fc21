"""Preprocessing transforms (PIL image -> ``[3, H, W]``) and the words checkpoints record for them."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dymu.data.images import Transform, load_image


def hf_transform(processor) -> Transform:
    """A transform from a transformers image processor (``AutoImageProcessor``)."""
    return _HFTransform(processor)


class _HFTransform:
    # a class, not a lambda, so DataLoader workers can pickle it under any start method
    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def squash_transform(processor, side: int) -> Transform:
    """``processor`` (a transformers image processor) resizing every image to ``side`` × ``side`` (squash, its own
    resampling and normalisation) with no crop: dymu's one preprocessing of a DINOv2 encoder at an input side,
    the same as the small VLM's processor (``dymu.small_vlm.build_processor``) at 224."""
    squashed = copy.deepcopy(processor)
    squashed.size = {"height": int(side), "width": int(side)}
    squashed.do_center_crop = False
    return _HFTransform(squashed)


class SquashResize:
    """PIL image -> ``[3, S, S]``: bicubic resize (squash) to S×S of the 8-bit image, scaled to [0, 1] and normalised
    by ``mean`` / ``std`` (without a transformers processor; :func:`squash_transform` is dymu's DINOv2 path)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = int(size), [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, image) -> Tensor:
        resized = load_image(image).resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def describe_preprocess(transform: object) -> str | None:
    """What a transform from :func:`hf_transform` (or a transformers image processor) does to an image's size, in
    words recorded in threshold checkpoints: ``"squash 224x224 bicubic"`` or ``"resize 256, crop 224x224
    bicubic"``; None when it is not known (e.g. an open_clip transform)."""
    if isinstance(transform, SquashResize):
        return f"squash {transform.size}x{transform.size} bicubic"
    processor = getattr(transform, "processor", transform)
    if not hasattr(processor, "do_resize") or not hasattr(processor, "size"):
        return None
    resample = getattr(processor, "resample", None)
    resample = _RESAMPLE.get(int(resample), str(resample)) if resample is not None else "default"
    size, crop, parts = processor.size, getattr(processor, "crop_size", None), []
    if processor.do_resize:
        if size_entry(size, "height") and size_entry(size, "width"):
            parts.append(f"squash {size_entry(size, 'height')}x{size_entry(size, 'width')}")
        elif size_entry(size, "shortest_edge"):
            parts.append(f"resize {size_entry(size, 'shortest_edge')}")
        else:
            return None
    if getattr(processor, "do_center_crop", False) and size_entry(crop, "height"):
        parts.append(f"crop {size_entry(crop, 'height')}x{size_entry(crop, 'width')}")
    return ", ".join(parts) + f" {resample}" if parts else None


def size_entry(size: object, key: str) -> int | None:
    """An entry of a processor's size (a dict, or transformers 5's ``SizeDict``)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None
