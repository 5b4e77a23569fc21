"""The towers, images and thresholds :mod:`dymu.bench.encoder` times, and a timer of the merge bookkeeping."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionModel, Dinov2Model

import dymu
from dymu import weights
from dymu.bench.timing import sync
from dymu.bench.towers import clip_tower
from dymu.data import SquashResize
from dymu.encoders.names import PACKAGED_CHECKPOINT_DIR
from dymu.samples import KINDS, make_image
from dymu.thresholds import load_thresholds
from dymu.weights.dinov2_onnx import IMAGENET_MEAN, IMAGENET_STD

#: committed DINOv2-S thresholds (``checkpoints/threshold_checkpoints`` in a checkout links to them)
REAL_CHECKPOINTS = PACKAGED_CHECKPOINT_DIR
#: scikit-image photographs of the ``--real`` batch, in this order
REAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "brick", "camera", "coins", "grass")


def build_tower(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    torch.manual_seed(args.seed)
    config, processor = clip_tower(
        hidden=args.hidden, mlp=args.mlp, layers=args.layers, heads=args.heads, image_size=args.image_size,
        patch_size=args.patch_size, attn_implementation="sdpa",
    )
    model = CLIPVisionModel(config).to(device, dtype).eval()
    return model, processor


class MergeTimer:
    """Adds up the time spent in ``DToMeState.merge`` while :meth:`active` (wraps the state's method)."""

    def __init__(self, state: Any, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.state, self.device, self.seconds, self.clock = state, device, 0.0, clock

    @contextlib.contextmanager
    def active(self, on: bool = True) -> Iterator["MergeTimer"]:
        self.seconds = 0.0
        if self.state is None or not on:
            yield self
            return
        original = self.state.merge

        def merge(*args: Any, **kwargs: Any):
            sync(self.device)
            t = self.clock()
            out = original(*args, **kwargs)
            sync(self.device)
            self.seconds += self.clock() - t
            return out

        self.state.merge = merge  # instance attribute shadows the method
        try:
            yield self
        finally:
            del self.state.merge


def merged_counts(
    model: torch.nn.Module, thresholds: Any, singles: list[torch.Tensor], batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer token counts ``[L+1, B]`` of the merged runs the ideals are compared with: the images alone (the
    authors' order takes its single-image path there) and the batch (its batch path, which
    ``dymu.encode(batching="per_image")`` keeps, so the per-image run has the batch's counts)."""
    dymu.patch(model, thresholds)
    with torch.inference_mode():
        alone = []
        for x in singles:
            model(pixel_values=x)
            alone.append(dymu.last_run(model).tokens_per_layer())
        model(pixel_values=batch)
        per_layer_batch = dymu.last_run(model).tokens_per_layer()
    dymu.unpatch(model)
    return torch.cat(alone, dim=1), per_layer_batch


def evaluation_images(n: int, size: int) -> list[Image.Image]:
    """``n`` images of graded complexity (flat, gradient, stripes, textured, …), unseen by calibration."""
    return [make_image(KINDS[i % len(KINDS)], size, seed=100 + i) for i in range(n)]


def photographs(names: tuple[str, ...]) -> list[tuple[str, Image.Image]]:
    """scikit-image's bundled photographs by name, as 8-bit RGB (greyscale ones repeated over the channels)."""
    try:
        from skimage import data  # optional: only the --real batch needs it
    except ImportError as err:
        raise SystemExit("--real needs scikit-image for its photographs (pip install scikit-image)") from err
    return [(name, Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")) for name in names]


def real_setup(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[Any, dict[str, Any], list[str], torch.Tensor]:
    """The real DINOv2-S, the committed checkpoints for ``--image-size`` and a batch of real images (pixels)."""
    try:
        path = weights.install("dinov2-small", progress=False)
    except Exception as err:  # missing packages, no model: say how to get it
        raise SystemExit("--real needs DINOv2-S: pip install 'dymu[real]' && dymu weights install dinov2-small "
                         f"({err})")
    model = Dinov2Model.from_pretrained(path, attn_implementation="sdpa").to(device, dtype).eval()
    ckpts = sorted(REAL_CHECKPOINTS.glob(f"dinov2-small-{args.image_size}-tome-*out.safetensors"),
                   key=lambda q: int(q.stem.split("-")[-1][:-3]))
    if not ckpts:
        raise SystemExit(f"no committed checkpoint dinov2-small-{args.image_size}-tome-*out under {REAL_CHECKPOINTS}")
    thresholds = {q.stem.split("-")[-1]: load_thresholds(q, encoder="dinov2-small") for q in ckpts}
    try:
        from easy_vqa import get_test_image_paths  # optional (dymu[real]): only --real reads its images
    except ImportError as err:
        raise SystemExit("--real needs the easy-vqa package (pip install 'dymu[real]')") from err
    vqa_paths = get_test_image_paths()
    images = photographs(REAL_PHOTOS[: args.photos])
    images += [(f"easy-vqa#{i}", Image.open(vqa_paths[i]).convert("RGB"))
               for i in sorted(vqa_paths)[: args.batch - len(images)]]
    transform = SquashResize(args.image_size, IMAGENET_MEAN, IMAGENET_STD)
    batch = torch.stack([transform(img) for _, img in images]).to(device, dtype)
    return model, thresholds, [n for n, _ in images], batch
