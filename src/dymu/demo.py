"""The embedded default job: DToMe on a small random ViT, end to end, with no downloads.

1. build a small random CLIP vision tower (transformers' ``CLIPVisionModel``) and its image processor
   (:func:`random_clip`, which ``dymu visualize`` uses as well);
2. find per-layer thresholds on a batch of built-in images (:mod:`dymu.samples`) with a merge schedule;
3. encode a flat and a textured image with those thresholds and report the tokens kept after each layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dymu
from dymu.samples import image_set, make_image
from dymu.thresholds import merge_schedule


@dataclass
class DemoResult:
    thresholds: list[float]
    merge_counts: list[int]
    tokens_per_layer: dict[str, list[int]]  # image name -> tokens at the input and after each block


def random_clip(*, layers: int = 6, image_size: int = 224, patch_size: int = 14, seed: int = 0):
    """The demo's small random CLIP ViT (``CLIPVisionModel``, eval mode, weights drawn after
    ``torch.manual_seed(seed)``) and its image processor; :func:`dymu.visualize.demo_tower` uses it too."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=layers,
        num_attention_heads=6,
        image_size=image_size,
        patch_size=patch_size,
    )
    model = CLIPVisionModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
    return model, processor


def run_demo(
    *,
    layers: int = 6,
    image_size: int = 224,
    patch_size: int = 14,
    r_total: int = 150,
    schedule: str = "constant",
    calibration_images: int = 16,
    seed: int = 0,
) -> DemoResult:
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if image_size < 2 * patch_size:
        raise ValueError(f"image_size must be at least {2 * patch_size} px (2 patches of {patch_size} px), got {image_size}")
    if not 0 <= r_total < (image_size // patch_size) ** 2:
        raise ValueError(f"r_total must be in [0, {(image_size // patch_size) ** 2}) for {image_size}-px images, got {r_total}")
    model, processor = random_clip(layers=layers, image_size=image_size, patch_size=patch_size, seed=seed)
    counts = merge_schedule(schedule, r_total, layers)
    dymu.patch(model, merge_counts=counts)
    with torch.no_grad():
        model(**processor(images=image_set(calibration_images, image_size), return_tensors="pt"))
    thresholds = dymu.last_run(model).found_thresholds
    dymu.configure(model, thresholds=thresholds)
    images = {"flat": make_image("flat", image_size), "textured": make_image("textured", image_size, seed=1)}
    with torch.no_grad():
        model(**processor(images=list(images.values()), return_tensors="pt"))
    per_layer = dymu.last_run(model).tokens_per_layer().T.tolist()
    return DemoResult(thresholds, counts, dict(zip(images, per_layer)))


def format_result(result: DemoResult) -> str:
    names = list(result.tokens_per_layer)
    n0 = result.tokens_per_layer[names[0]][0]
    lines = [
        "DToMe on a random CLIP ViT: tokens kept per layer (CLS included)",
        f"thresholds found on the calibration images for {sum(result.merge_counts)} merges "
        f"(target {n0 - sum(result.merge_counts)} tokens per image on average)",
        f"{'layer':>5} {'r_l':>4} {'threshold':>9} " + " ".join(f"{n:>9}" for n in names),
        f"{'input':>5} {'':>4} {'':>9} " + " ".join(f"{result.tokens_per_layer[n][0]:>9}" for n in names),
    ]
    for i, (r, t) in enumerate(zip(result.merge_counts, result.thresholds)):
        lines.append(f"{i:>5} {r:>4} {t:>9.4f} " + " ".join(f"{result.tokens_per_layer[n][i + 1]:>9}" for n in names))
    return "\n".join(lines)
