"""LLaVA-OneVision with DyMU, on transformers' own ``LlavaOnevisionForConditionalGeneration`` (no forked model code).

:func:`enable_dymu_onevision` turns a stock model into a DyMU model in place:

1. **DToMe in the SigLIP tower** (:func:`dymu.patch`): every crop of every image of the call — each image's base
   crop and its anyres tiles, as the stock processor makes them — goes through the patched tower as *one* batch
   of crops, each keeping its own number of tokens (``token_order="batch"`` by default: the authors' OneVision
   code flattens the crops into a batch). :func:`enable_dymu_onevision` runs the tower one call per crop by default
   (``crop_batching="per_image"``: no padding, the cost follows each crop's kept tokens; the same result as one
   padded call, which ``"padded"`` selects); :func:`encode_images` called alone defaults to ``"padded"``. The
   features are those of ``vision_feature_layer`` (stock default -1), selected with
   ``dymu.encode(..., layer=vision_feature_layer)``.
2. **One group map per image, on the stock layout.** The stock ``pack_image_features`` lays an image out as the
   base crop's ``h·w`` tokens, then the tiles stitched into one grid (row-major over the whole stitched image),
   unpadded, with ``image_newline`` after each row (multi-image prompts: base crop + one newline per image).
   :func:`stock_layout` derives, for every stock placeholder position, which crop patch ``(crop, patch)`` it
   comes from or that it is an ``image_newline`` — by running the *stock* ``pack_image_features`` itself on
   integer codes instead of features, so the layout is the stock one by construction. Then:

   * a merged token's group = the stock positions whose source patch it covers (its ``source_map``);
   * a patch that unpadding removes is in no group; a merged token all of whose patches were unpadded away is
     dropped (it has no stock position, so the stock model would not have seen it either);
   * each ``image_newline`` is a group of one at its stock position;
   * slots are numbered by their first stock position, so the merged sequence follows the stock order.

   With merging off, every group is one position and the features are the stock ones: stock logits.
3. **Placeholders collapsed**: each image's run of ``image_token_id`` (its stock count) is collapsed to its number
   of slots, rows are left-padded again, and the projected merged features go to the stock code through
   ``mm_encoder_outputs``; the Qwen2 decoder runs VTU (:mod:`dymu.vtu`) on the combined group maps.

**Downsampling past ``anyres_max_N``**: when the unpadded grid is larger than ``N`` crops (ratio > 1.1), the
stock model bilinearly downsamples the stitched features. A bilinear sample blends up to four patches; VTU can only
*copy* one merged token to a virtual position, so it cannot represent it. ``downsample="nearest"`` (default) keeps
the stock *layout* (same positions, rows and newlines, same placeholder count) and maps every downsampled
position to its nearest source patch (``interpolate(mode="nearest-exact")``, the pixel-centre rule): that image
then differs from stock even with merging off (nearest instead of bilinear features), everything else is as above.
``downsample="error"`` refuses such images instead. Images that do not reach the limit are unaffected.

Video (``pixel_values_videos``) is refused. Inputs are otherwise what the stock model takes (the processor's
output, any padding side). ``generate`` returns the caller's ``input_ids`` followed by the new tokens;
``forward``'s logits are laid out on the merged, left-padded sequence. Per-image visual token counts (merged
tokens + newlines) and per-crop token counts come back with the call (:mod:`dymu.vlm.base`). This module is the
OneVision adapter of that one VLM path (:class:`OnevisionFamily`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    image_size_to_num_patches,
)

import dymu
from dymu import baselines
from dymu.baselines import Method
from dymu.data import load_image
from dymu.encoders.encoding import Batching
from dymu.merge import TokenOrder
from dymu.vlm import base
from dymu.vtu import VTUMode

logger = logging.getLogger(__name__)

Downsample = Literal["nearest", "error"]
NEWLINE = -1  # layout code of an image_newline position
_NO_LIMIT = "anyres_max_1000000000"


# ---------------------------------------------------------------------------------------------------------------
# Layout: for every stock placeholder position, the crop patch it comes from (or a newline)
# ---------------------------------------------------------------------------------------------------------------


def _inner(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "lm_head") else model


def crops_per_image(model: nn.Module, image_sizes: Tensor, batch_num_images: Tensor | list[int] | None) -> list[int]:
    """Crops the stock ``get_image_features`` takes per image (base + tiles; 1 for images of multi-image prompts)."""
    config = _inner(model).config
    if batch_num_images is None:
        need = [True] * len(image_sizes)
    else:
        need = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        if len(need) != len(image_sizes):
            raise ValueError(
                f"batch_num_images {list(map(int, batch_num_images))} counts {len(need)} images, "
                f"but image_sizes has {len(image_sizes)}"
            )
    return [
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if n else 1
        for size, n in zip(image_sizes, need)
    ]


def _pack_codes(model: nn.Module, num_crops: int, image_size: Tensor, aspect: str) -> Tensor:
    """Stock ``pack_image_features`` run on integer codes ``crop·hw + patch`` (newline = -1) of one image."""
    inner = _inner(model)
    vc = inner.config.vision_config
    hw = (vc.image_size // vc.patch_size) ** 2
    codes = torch.arange(num_crops * hw, dtype=torch.float64).view(num_crops, hw, 1)
    newline = torch.full((1,), float(NEWLINE), dtype=torch.float64)
    packed, _ = LlavaOnevisionModel.pack_image_features(
        inner, [codes], image_size.view(1, 2), image_newline=newline, vision_aspect_ratio=aspect
    )
    return packed[0][:, 0]


def stock_layout(
    model: nn.Module, num_crops: int, image_size: Tensor, *, downsample: Downsample = "nearest"
) -> Tensor:
    """Codes ``[n_stock]`` of one image's stock placeholder positions: ``crop·h·w + patch`` or ``NEWLINE`` (-1).

    ``crop`` is local to the image (0 = base crop), ``patch`` the raster index in the crop's ``h×w`` grid. Derived
    by the stock ``pack_image_features`` itself; see the module docstring for downsampled images.
    """
    inner = _inner(model)
    aspect = inner.config.vision_aspect_ratio or "anyres_max_9"
    try:
        full = _pack_codes(model, num_crops, image_size, _NO_LIMIT)
        stock = _pack_codes(model, num_crops, image_size, aspect)
    except (RuntimeError, ValueError) as error:
        vc = inner.config.vision_config
        raise ValueError(
            f"image of size {tuple(int(s) for s in image_size)} (H, W) with {num_crops} crops does not fit the anyres "
            f"grid (image_grid_pinpoints {inner.config.image_grid_pinpoints}, crops of {vc.image_size} px): {error}"
        ) from error
    if stock.shape == full.shape and torch.equal(stock, full):
        return full.round().long()
    # the stock model downsamples this image bilinearly (past anyres_max_N)
    if downsample == "error":
        raise ValueError(
            f"the stock layout downsamples this image (size {tuple(int(s) for s in image_size)} (H, W), "
            f"{num_crops - 1} tiles, past {aspect}) by bilinear interpolation, which VTU cannot represent "
            "(a bilinear sample blends several patches); use downsample='nearest' or a smaller image"
        )
    vc = inner.config.vision_config
    base = (vc.image_size // vc.patch_size) ** 2
    rows_full = int((full[base:] == NEWLINE).sum())
    grid = full[base:].view(rows_full, -1)[:, :-1]  # drop the newline column
    rows = int((stock[base:] == NEWLINE).sum())
    cols = (stock.numel() - base) // rows - 1
    nearest = F.interpolate(grid[None, None], size=[rows, cols], mode="nearest-exact")[0, 0]
    nearest = torch.cat([nearest, torch.full((rows, 1), float(NEWLINE), dtype=nearest.dtype)], dim=1)
    return torch.cat([full[:base], nearest.flatten()]).round().long()


# ---------------------------------------------------------------------------------------------------------------
# Encoding: all crops in one DToMe batch, one group map per image
# ---------------------------------------------------------------------------------------------------------------


def _flat_crops(pixel_values: Tensor | list[Tensor], crops: list[int]) -> Tensor:
    if isinstance(pixel_values, (list, tuple)):
        pixel_values = [p if p.dim() == 4 else p[None] for p in pixel_values]
        return torch.cat([p[:n] for p, n in zip(pixel_values, crops)])
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(crops):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images but image_sizes has {len(crops)}")
        short = [i for i, n in enumerate(crops) if n > pixel_values.shape[1]]
        if short:
            raise ValueError(
                f"image {short[0]} needs {crops[short[0]]} crops for its size but pixel_values hold "
                f"{pixel_values.shape[1]} per image: the image_sizes do not match the processed pixels"
            )
        return torch.cat([p[:n] for p, n in zip(pixel_values, crops)])
    if pixel_values.dim() == 4:
        if pixel_values.shape[0] != sum(crops):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} crops, image_sizes need {sum(crops)}")
        return pixel_values
    raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")


def _image_groups(layout: Tensor, token_of: Tensor, crop0: int, hw: int, width: int) -> tuple[Tensor, Tensor]:
    """Local groups ``[n]`` and the slot keys (``crop·width + token`` or ``-(position+1)`` for newlines)."""
    n = layout.numel()
    is_nl = layout == NEWLINE
    code = layout.clamp(min=0)
    crop = crop0 + code // hw
    keys = crop * width + token_of[crop, code % hw]
    keys = torch.where(is_nl, -(torch.arange(n) + 1), keys)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((uniq.numel(),), n, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(n), "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank[inverse], uniq[order]


@torch.no_grad()
def encode_images(
    model: nn.Module,
    pixel_values: Tensor | list[Tensor],
    image_sizes: Tensor,
    batch_num_images: Tensor | list[int] | None = None,
    *,
    vision_feature_layer: int | None = None,
    downsample: Downsample = "nearest",
    crop_batching: Batching = "padded",
) -> base.EncodedImages:
    """Run every crop through the DToMe tower (one padded batch, or one call per crop with
    ``crop_batching="per_image"``: same result); per image its merged features and group map."""
    inner = _inner(model)
    config = inner.config
    layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"DyMU needs one vision_feature_layer (merged token sets differ between layers), got {layer!r}"
        )
    strategy = config.vision_feature_select_strategy
    tower = inner.vision_tower
    state = dymu.get_state(tower)
    if strategy == "default" and not state.protect_first:
        raise ValueError(
            f"vision_feature_select_strategy='default' drops a CLS token, but {state.encoder} has none "
            "(LLaVA-OneVision's SigLIP uses 'full')"
        )
    image_sizes = torch.as_tensor(image_sizes).cpu()
    crops = crops_per_image(model, image_sizes, batch_num_images)
    flat = _flat_crops(pixel_values, crops)
    vc = config.vision_config
    if tuple(flat.shape[-2:]) != (vc.image_size, vc.image_size):
        raise ValueError(f"crops of {tuple(flat.shape[-2:])} px, but the tower takes {vc.image_size}×{vc.image_size}")
    layouts = [stock_layout(model, n, size, downsample=downsample) for size, n in zip(image_sizes, crops)]
    enc = dymu.encode(tower, flat, layer=layer, drop_cls=strategy == "default", batching=crop_batching)
    start = 1 if strategy == "default" else 0
    projected = inner.multi_modal_projector(enc.hidden_states.to(inner.multi_modal_projector.linear_1.weight.dtype))
    width = projected.shape[1]
    hw = (vc.image_size // vc.patch_size) ** 2
    token_of = enc.padded_source_map[:, start:].cpu().long()  # [crops, hw] -> row of hidden_states (encoder order)
    if token_of.shape[1] != hw:
        raise ValueError(f"the tower gives {token_of.shape[1]} patches per crop, the layout expects {hw}")
    flat_proj = projected.reshape(-1, projected.shape[-1])
    newline = inner.image_newline.to(projected.device, projected.dtype)
    counts = [int(c) - start for c in enc.mask.sum(1).tolist()]
    features, groups, crop_counts = [], [], []
    crop0 = 0
    for layout, n in zip(layouts, crops):
        local, keys = _image_groups(layout, token_of, crop0, hw, width)
        rows = flat_proj[keys.clamp(min=0).to(projected.device)]
        rows = torch.where((keys < 0).to(projected.device)[:, None], newline[None], rows)
        features.append(rows)
        groups.append(local)
        crop_counts.append(counts[crop0 : crop0 + n])
        crop0 += n
    return base.EncodedImages(features, groups, crop_counts)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------

VIDEO_MESSAGE = (
    "video is not supported with DyMU yet: got pixel_values_videos; the stock video path pools h·w tokens per "
    "frame. Call disable_dymu_onevision(model) for video inputs"
)


class OnevisionFamily:
    """The LLaVA-OneVision adapter of :mod:`dymu.vlm.base`: all crops in one DToMe batch, 1-D RoPE (Qwen2)."""

    name = "onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    token_aligned: tuple[str, ...] = ()

    def encode(self, model: nn.Module, pixel_values: Any, kwargs: dict, state: base.VLMState) -> base.EncodedImages:
        """:func:`encode_images` with the stock keyword arguments it consumes popped from ``kwargs``."""
        for name in ("pixel_values_videos", "image_sizes_videos", "vision_aspect_ratio"):
            kwargs.pop(name, None)
        strategy = kwargs.pop("vision_feature_select_strategy", None)
        if strategy is not None and strategy != model.config.vision_feature_select_strategy:
            raise ValueError("a vision_feature_select_strategy other than the config's is not supported with DyMU")
        image_sizes = kwargs.pop("image_sizes", None)
        if image_sizes is None:
            raise ValueError("pixel_values without image_sizes: pass the processor's image_sizes")
        if state.method == "tome":
            vc = model.config.vision_config
            baselines.configure_tome(_inner(model).vision_tower, (vc.image_size // vc.patch_size) ** 2,
                                     state.token_budget, model.config.vision_feature_layer)
        return encode_images(
            model, pixel_values, image_sizes, kwargs.pop("batch_num_images", None),
            vision_feature_layer=kwargs.pop("vision_feature_layer", None), downsample=state.options["downsample"],
            crop_batching=state.options.get("crop_batching", "per_image"),
        )

    def stock_counts(self, model: nn.Module, inputs: Any) -> list[int]:
        return stock_visual_tokens(model, inputs["image_sizes"], inputs.get("batch_num_images"))

    def virtual_positions(self, model: nn.Module, prepared: base.Prepared) -> Tensor:
        return base.rope_positions(model, prepared)

    def feature_kwargs(self, encoded: base.EncodedImages) -> dict:
        return base.feature_kwargs(encoded)

    def calibration_pixels(self, model: nn.Module, processor: Any, images: list[Any]) -> Tensor:
        return image_crops(model, processor, images)

    def refuse(self, kwargs: dict) -> None:
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError(VIDEO_MESSAGE)


ONEVISION = OnevisionFamily()


def enable_dymu_onevision(
    model: nn.Module,
    thresholds: dymu.encoders.ThresholdsLike | None = None,
    *,
    vtu: VTUMode = "fast",
    token_order: TokenOrder | None = "batch",
    threshold_offset: float = 0.0,
    downsample: Downsample = "nearest",
    crop_batching: Batching = "per_image",
    method: Method = "dymu",
    token_budget: int | None = None,
) -> nn.Module:
    """Make a stock ``LlavaOnevisionForConditionalGeneration`` run DyMU (in place; returns the model).

    ``thresholds=None`` keeps merging off (stock outputs, except images the stock model downsamples, see the module
    docstring). ``vtu``: ``"fast"`` (default), ``"exact"`` or ``"off"`` (merged tokens at consecutive positions).
    ``token_order`` goes to :func:`dymu.patch` (default ``"batch"``: the authors' OneVision crop batch; counts do
    not depend on the batch). ``downsample``: ``"nearest"`` or ``"error"`` for images past ``anyres_max_N``.
    ``crop_batching``: ``"per_image"`` (default: one tower call per crop, no padding, so the cost follows each
    crop's kept tokens, see bench/onevision_crops.py)
    or ``"padded"`` (all crops in one padded tower batch); both give the same outputs. ``method``: ``"dymu"`` or
    ``"tome"`` (fixed-count ToMe keeping ``token_budget`` tokens per crop, :mod:`dymu.baselines`); the selections
    (``"prune"``, ``"random"``) are LLaVA-1.5 only for now.
    """
    if not isinstance(model, LlavaOnevisionForConditionalGeneration):
        raise ValueError(
            f"enable_dymu_onevision expects a LlavaOnevisionForConditionalGeneration, got {type(model).__name__}"
        )
    if downsample not in ("nearest", "error"):
        raise ValueError(f"downsample must be 'nearest' or 'error', got {downsample!r}")
    if crop_batching not in ("padded", "per_image"):
        raise ValueError(f"crop_batching must be 'padded' or 'per_image', got {crop_batching!r}")
    if not isinstance(model.config.vision_feature_layer, int):
        raise ValueError(
            f"DyMU needs one vision_feature_layer (merged token sets differ between layers), "
            f"got {model.config.vision_feature_layer!r}"
        )
    if method in baselines.SELECTIONS:
        raise ValueError(f"method={method!r} is not available for LLaVA-OneVision yet; use 'dymu' or 'tome'")
    return base.enable(
        model, ONEVISION, thresholds=thresholds, vtu=vtu, threshold_offset=threshold_offset,
        token_order=token_order, method=method, token_budget=token_budget, log=logger,
        undo_hint="disable_dymu_onevision", downsample=downsample, crop_batching=crop_batching,
    )


def disable_dymu_onevision(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_dymu_onevision`: stock class, tower and attention implementation."""
    return base.disable(model)


# ---------------------------------------------------------------------------------------------------------------
# Counting and budgets (the command line and the lmms-eval backend)
# ---------------------------------------------------------------------------------------------------------------


def stock_visual_tokens(
    model: nn.Module, image_sizes: Tensor, batch_num_images: Tensor | list[int] | None = None
) -> list[int]:
    """Per image, the visual tokens the *stock* model gives the LLM (its placeholder count: base crop, unpadded
    tiles and newlines, after any downsampling): what a call's ``visual_token_counts`` are compared with."""
    image_sizes = torch.as_tensor(image_sizes).cpu()
    crops = crops_per_image(model, image_sizes, batch_num_images)
    return [int(stock_layout(model, n, size).numel()) for size, n in zip(image_sizes, crops)]


def image_crops(model: nn.Module, processor: Any, images: list[Any]) -> Tensor:
    """Every crop (base + anyres tiles) the stock model encodes for ``images`` (each a single-image prompt),
    as one ``[crops, 3, H, W]`` batch."""
    out = processor.image_processor([load_image(i) for i in images], return_tensors="pt")
    crops = crops_per_image(model, out["image_sizes"], None)
    return _flat_crops(out["pixel_values"], crops)


calibrate_token_budget = base.calibrate_token_budget
