"""LLaVA-1.5 with DyMU, on transformers' own ``LlavaForConditionalGeneration`` (no forked model code).

:func:`enable_dymu` turns a stock model into a DyMU model in place:

1. the vision tower is patched with DToMe (:func:`dymu.patch`), so each image keeps its own number of tokens;
2. the model instance gets a thin subclass whose ``forward``/``generate`` encode the images first, collapse each
   image's run of placeholder tokens (the processor expanded every ``<image>`` to the full 576) to that image's
   merged count, and hand the projected merged features to the stock code through ``mm_encoder_outputs``;
3. the language model runs VTU (:mod:`dymu.vtu`): every merged token stands for the original patch positions it
   covers (its source map), placed where the image's placeholders were.

Images are encoded by :func:`dymu.encode` at ``vision_feature_layer`` (the tower stops there), which gives the merged
features in spatial order and their source maps. Inputs are what the stock model takes (the llava-hf processor's
output, any padding side), and ``forward`` shows ``generate`` the stock signature (so prefill keeps only the last
logits); ``generate`` returns the caller's ``input_ids`` followed by the new tokens, like the stock model.
``forward``'s logits are laid out on the merged sequence (left-padded). Each call's per-image visual token counts
are on ``model.dymu_last_counts`` (also on the forward output as ``visual_token_counts``) and logged at INFO level.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration

import dymu
from dymu import vtu as vtu_lib
from dymu.data import load_image
from dymu.merge import TokenOrder
from dymu.vlm import base
from dymu.vtu import VTUMode, check_vtu_mode

logger = logging.getLogger(__name__)


@dataclass
class DyMUSettings:
    """What a ``dymu`` block in ``config.json`` holds (all optional).

    ``downsample`` (``"nearest"`` / ``"error"``) is for LLaVA-OneVision only (see :mod:`dymu.vlm.onevision`).
    """

    encoder: str | None = None  # DyMU encoder name, e.g. "ViT-L-14-336-tome-72out"
    thresholds: str | None = None  # threshold checkpoint path (default: the encoder name's checkpoint)
    vtu: VTUMode = "fast"
    threshold_offset: float = 0.0
    downsample: str | None = None  # OneVision: images past anyres_max_N (None: "nearest")

    KEYS = {  # the keys each model family's block may hold
        "llava": ("encoder", "thresholds", "vtu", "threshold_offset"),
        "onevision": ("encoder", "thresholds", "vtu", "threshold_offset", "downsample"),
    }

    @classmethod
    def from_dict(cls, block: dict[str, Any], family: str = "llava") -> "DyMUSettings":
        """Read a ``dymu`` block of a ``family`` checkpoint (``"llava"``: LLaVA-1.5, ``"onevision"``)."""
        if not isinstance(block, dict):
            raise ValueError(f"the 'dymu' config block must be a JSON object, got {type(block).__name__}")
        valid = cls.KEYS[family]
        unknown = set(block) - set(valid)
        if unknown:
            raise ValueError(
                f"unknown keys in the 'dymu' config block: {sorted(unknown)}; expected {', '.join(valid)}"
            )
        settings = cls(**block)
        check_vtu_mode(settings.vtu, "dymu.vtu")
        if settings.downsample not in (None, "nearest", "error"):
            raise ValueError(f"dymu.downsample must be 'nearest' or 'error', got {settings.downsample!r}")
        return settings


@dataclass
class PreparedInputs:
    """Merged-layout inputs for the stock model, plus what VTU needs."""

    input_ids: Tensor  # [B, M] left-padded, each image's placeholders collapsed to its merged count
    attention_mask: Tensor  # [B, M]
    position_ids: Tensor | None  # [B, M] virtual positions (VTU), None without VTU
    image_features: list[Tensor]  # per image [k_i, D_text]
    visual_token_counts: list[int]
    vtu_batch: vtu_lib.VTUBatch | None = None  # the VTU state when VTU is on
    groups: list[Tensor] = field(default_factory=list)  # per row: virtual position -> merged slot


def full_image_tokens(model: nn.Module, pixel_values: Tensor | None = None, processor: Any = None) -> int:
    """Placeholder tokens per image in the stock model (576 for CLIP ViT-L/14-336 with 'default'): the patch grid
    of ``pixel_values``, else of what ``processor`` makes of an image, else of the vision config's image size —
    which a DINOv2 tower's config does not give (518: it takes any input size), so a DINOv2 needs one of the two."""
    vc = model.config.vision_config
    if pixel_values is None and processor is not None:
        from PIL import Image

        pixel_values = processor.image_processor(Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"]
    if pixel_values is not None:
        h, w = pixel_values.shape[-2:]
    elif vc.model_type == "dinov2":
        raise ValueError(
            "the full token count of a DINOv2 tower depends on its input size: pass the pixel values or the processor"
        )
    else:
        h = w = vc.image_size
    patches = (h // vc.patch_size) * (w // vc.patch_size)
    return patches + (1 if model.config.vision_feature_select_strategy == "full" else 0)


def encode_images(model: nn.Module, pixel_values: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Run the DToMe tower; return per image its projected merged features ``[k_i, D]`` and patch map.

    :func:`dymu.encode` at ``vision_feature_layer`` (the tower stops after that layer; CLS dropped for the
    'default' strategy): features in spatial order, and a patch map ``[n_full]`` giving, for every feature
    position the stock model would produce, the index of the merged feature that covers it.
    """
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"DyMU needs one vision_feature_layer (merged token sets differ between layers), got {layer!r}"
        )
    drop_cls = config.vision_feature_select_strategy == "default"
    enc = dymu.encode(model.model.vision_tower, pixel_values, layer=layer, drop_cls=drop_cls, stop_early=True)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(torch.cat(enc.features))
    return list(projected.split(enc.num_tokens)), enc.source_maps


def collapse_placeholders(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    image_token_id: int,
    full_count: int,
    patch_maps: list[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Per row: merged token ids (each image's run collapsed to its merged count) and the groups.

    ``groups[p]`` is the merged slot of virtual position ``p``, the virtual sequence being the row as the stock
    model sees it (each image ``full_count`` positions). A run of ``full_count * m`` placeholders holds ``m``
    images; a single placeholder stands for one image (the original LLaVA's unexpanded ``<image>``).
    """
    rows, groups = [], []
    image = 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        values, lengths = torch.unique_consecutive(ids == image_token_id, return_counts=True)
        merged, row_groups = [], []
        slot = position = 0
        for is_image, length in zip(values.tolist(), lengths.tolist()):
            if not is_image:
                merged.append(ids[position : position + length])
                row_groups.append(torch.arange(slot, slot + length))
                slot += length
            else:
                if length != 1 and length % full_count:
                    raise ValueError(
                        f"row {b} has a run of {length} image tokens; expected {full_count} per image "
                        "(the processor's expansion of <image>) or a single <image> per image"
                    )
                for _ in range(max(1, length // full_count)):
                    if image >= len(patch_maps):
                        raise ValueError(
                            f"the prompts hold more image placeholders than the {len(patch_maps)} images given"
                        )
                    pmap = patch_maps[image].to(ids.device)
                    k = int(pmap.max()) + 1
                    merged.append(torch.full((k,), image_token_id, dtype=ids.dtype, device=ids.device))
                    row_groups.append(pmap + slot)
                    slot += k
                    image += 1
            position += length
        rows.append(torch.cat(merged))
        groups.append(torch.cat(row_groups).cpu())
    if image != len(patch_maps):
        raise ValueError(
            f"{len(patch_maps)} images were given but the prompts hold placeholders for {image}: "
            "each image needs an <image> token in its prompt"
        )
    return rows, groups


def prepare_inputs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    pixel_values: Tensor,
    vtu: VTUMode | None = None,
) -> PreparedInputs:
    """Encode the images with DToMe and lay the prompt out on the merged sequence (left-padded).

    ``vtu``: ``"fast"``/``"exact"`` give the VTU batch and its virtual positions, ``"off"`` neither (merged
    tokens at consecutive positions); ``None`` follows the language model (:func:`dymu.vtu.vtu_mode`).
    """
    config = model.config
    vtu = vtu_lib.vtu_mode(model) if vtu is None else check_vtu_mode(vtu, "vtu")
    if not bool((input_ids == config.image_token_id).any()):
        raise ValueError(
            f"pixel_values were given but no prompt holds the image token (id {config.image_token_id}); "
            "put '<image>' in the prompt (the chat template does this for {'type': 'image'} content)"
        )
    features, patch_maps = encode_images(model, pixel_values)
    rows, groups = collapse_placeholders(
        input_ids, attention_mask, config.image_token_id, full_image_tokens(model, pixel_values), patch_maps
    )
    counts = [f.shape[0] for f in features]
    pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0
    batch = vtu_lib.prepare_vtu(groups, padding_side="left", num_merged=[r.shape[0] for r in rows])
    ids = batch.pad(rows, value=pad)
    mask = batch.attention_mask.to(ids.device)
    if vtu == "off":
        return PreparedInputs(ids, mask, None, features, counts, None, groups)
    return PreparedInputs(ids, mask, batch.position_ids.to(ids.device), features, counts, batch, groups)


def _prepare(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor,
             kwargs: dict) -> PreparedInputs:
    return prepare_inputs(model, input_ids, attention_mask, pixel_values, vtu=vtu_lib.vtu_mode(model))


def enable_dymu(
    model: nn.Module,
    thresholds: dymu.encoders.ThresholdsLike | None = None,
    *,
    vtu: VTUMode = "fast",
    threshold_offset: float = 0.0,
    token_order: TokenOrder | None = None,
) -> nn.Module:
    """Make a stock ``LlavaForConditionalGeneration`` run DyMU (in place; returns the model).

    ``thresholds=None`` keeps merging off (the model then reproduces the stock outputs). ``vtu`` selects
    virtual token unmerging in the language model: ``"fast"`` (default), ``"exact"``, or ``"off"`` (merged
    tokens at consecutive positions, the plain baseline). ``token_order`` is passed to :func:`dymu.patch`
    (``None``: the checkpoint's order; ``"authors"`` lets a lone image keep other counts than inside a
    batch, as the original code does; ``"batch"``/``"single"`` make counts independent of the batch).
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise ValueError(f"enable_dymu expects a LlavaForConditionalGeneration, got {type(model).__name__}")
    return base.enable(
        model, _prepare, thresholds=thresholds, vtu=vtu, threshold_offset=threshold_offset,
        token_order=token_order, log=logger,
    )


def disable_dymu(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_dymu`: stock classes, hooks and attention implementation."""
    return base.disable(model)


@dataclass
class Answer:
    """One generated answer and how many visual tokens its image kept."""

    text: str
    visual_tokens: int


@torch.no_grad()
def calibrate_token_budget(model: nn.Module, processor: Any, images: list[Any], target: float) -> float:
    """Set the tower's threshold offset so that ``images`` keep ``target`` visual tokens on average.

    :func:`dymu.calibrate_budget` at the model's ``vision_feature_layer``; the offset stays set and is returned.
    """
    tower = model.model.vision_tower
    if dymu.get_state(tower).mode != "infer":
        raise ValueError("a token budget needs thresholds: load the model with DyMU thresholds first")
    pixel_values = processor.image_processor([load_image(i) for i in images], return_tensors="pt").pixel_values
    layer = model.config.vision_feature_layer
    return dymu.calibrate_budget(tower, pixel_values.to(model.device), target, layer=layer).offset


@torch.no_grad()
def answer(
    model: nn.Module,
    processor: Any,
    images: list[Any],
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    **generate_kwargs: Any,
) -> list[Answer]:
    """Greedy answers to one question per image, batched; each prompt is wrapped in the chat template."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
    pil = [load_image(i) for i in images]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=pil, text=texts, return_tensors="pt", padding=True).to(model.device)
    generate_kwargs.setdefault("do_sample", False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    decoded = processor.batch_decode(new_tokens, skip_special_tokens=True)
    counts = getattr(model, "dymu_last_counts", None)
    if counts is None and pil:
        counts = [full_image_tokens(model, inputs["pixel_values"])] * len(pil)
    return [Answer(text.strip(), c) for text, c in zip(decoded, counts or [])]
