"""Random-weight models of real shapes for the encoder benchmarks, their input images, and the ideal runs they are
compared with (the stock blocks at a merged run's token counts, no merge bookkeeping)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig

from dymu.samples import make_image

#: :mod:`dymu.samples` kinds from flat to busy (the crop / image sets of the tower benchmarks)
GRADED_KINDS = ("flat", "gradient", "stripes", "textured")


def graded_images(n: int, size: int, seed: int) -> list[Image.Image]:
    """``n`` images from flat to busy (:data:`GRADED_KINDS` in equal runs), image ``i`` drawn with ``seed + i``."""
    kinds = [GRADED_KINDS[min(len(GRADED_KINDS) - 1, i * len(GRADED_KINDS) // n)] for i in range(n)]
    return [make_image(kind, size, seed=seed + i) for i, kind in enumerate(kinds)]


def clip_tower(
    *, hidden: int, mlp: int, layers: int, heads: int, image_size: int, patch_size: int = 14, **config: Any
) -> tuple[Any, Any]:
    """A CLIP vision config of the given shape (random-weight benchmarks) and the matching image processor."""
    vision = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch_size, **config,
    )
    return vision, CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)


def ideal_block(layer: torch.nn.Module, x: torch.Tensor, n_next: int) -> torch.Tensor:
    """One stock ViT block (CLIP/SigLIP or DINOv2) as DToMe runs it, minus the bookkeeping: attention at ``x``'s
    count, then the MLP at ``n_next`` tokens (DToMe merges between the two; a slice stands in for the merge)."""
    if hasattr(layer, "self_attn"):  # CLIP / SigLIP: layer_norm1 → self_attn → + → layer_norm2 → mlp → +
        h = (x + layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=None)[0])[:, :n_next]
        return h + layer.mlp(layer.layer_norm2(h))
    # DINOv2: norm1 → attention → layer_scale1 → + → norm2 → mlp → layer_scale2 → +
    h = (x + layer.layer_scale1(layer.attention(layer.norm1(x))[0]))[:, :n_next]
    return h + layer.layer_scale2(layer.mlp(layer.norm2(h)))


def ideal_runner(
    embeddings: torch.nn.Module, layers: Sequence[torch.nn.Module], per_layer: torch.Tensor,
    pixels: Sequence[torch.Tensor], *, width: int, seed: int, device: torch.device, dtype: torch.dtype,
) -> Callable[[], None]:
    """The best any DToMe implementation could do: the embeddings at full length, then block ``l`` of image ``b``
    with attention on ``per_layer[l, b]`` tokens and the MLP on ``per_layer[l + 1, b]`` (``per_layer [L+1, B]``, a
    run's ``tokens_per_layer``), image by image, no merge bookkeeping. Returns the callable to time."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [[torch.randn(1, int(per_layer[l, b]), width, generator=gen).to(device, dtype)
               for l in range(len(layers))] for b in range(per_layer.shape[1])]

    def run() -> None:
        with torch.inference_mode():
            for b, x in enumerate(pixels):
                embeddings(x)
                for l, layer in enumerate(layers):
                    ideal_block(layer, inputs[b][l], int(per_layer[l + 1, b]))

    return run
