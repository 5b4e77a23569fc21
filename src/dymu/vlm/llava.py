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
come back with it (:mod:`dymu.vlm.base`) and are logged at INFO level. This module is the LLaVA-1.5 adapter of
that one VLM path; ``method=`` selects the baselines of :mod:`dymu.baselines`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

import dymu
from dymu import baselines
from dymu.baselines import Method
from dymu.data import load_image
from dymu.merge import TokenOrder
from dymu.vlm import base
from dymu.vtu import VTUMode


def full_image_tokens(model: nn.Module, pixel_values: Tensor | None = None, processor: Any = None) -> int:
    """Placeholder tokens per image in the stock model (576 for CLIP ViT-L/14-336 with 'default'): the patch grid
    of ``pixel_values``, else of what ``processor`` makes of an image, else of the vision config's image size —
    which a DINOv2 tower's config does not give (518: it takes any input size), so a DINOv2 needs one of the two."""
    vc = model.config.vision_config
    if pixel_values is None and processor is not None:
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


def _feature_layer(model: nn.Module) -> int:
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"DyMU needs one vision_feature_layer (merged token sets differ between layers), got {layer!r}"
        )
    return layer


def encode_images(model: nn.Module, pixel_values: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Run the DToMe tower; return per image its projected merged features ``[k_i, D]`` and patch map.

    :func:`dymu.encode` at ``vision_feature_layer`` (the tower stops after that layer; CLS dropped for the
    'default' strategy): features in spatial order, and a patch map ``[n_full]`` giving, for every feature
    position the stock model would produce, the index of the merged feature that covers it.
    """
    drop_cls = model.config.vision_feature_select_strategy == "default"
    layer = _feature_layer(model)
    enc = dymu.encode(model.model.vision_tower, pixel_values, layer=layer, drop_cls=drop_cls, stop_early=True)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(torch.cat(enc.features))
    return list(projected.split(enc.num_tokens)), enc.source_maps


class LlavaFamily:
    """The LLaVA-1.5 adapter of :mod:`dymu.vlm.base`: one crop per image, 1-D RoPE."""

    name = "llava"
    model_class = "LlavaForConditionalGeneration"
    token_aligned: tuple[str, ...] = ()

    def encode(self, model: nn.Module, pixel_values: Tensor, kwargs: dict, state: base.VLMState) -> base.EncodedImages:
        seeds = kwargs.pop("selection_seeds", None)
        vc = model.config.vision_config
        patches = (pixel_values.shape[-2] // vc.patch_size) * (pixel_values.shape[-1] // vc.patch_size)
        if state.method in baselines.SELECTIONS:
            seeds = [state.seed + i for i in range(pixel_values.shape[0])] if seeds is None else list(seeds)
            if len(seeds) != pixel_values.shape[0]:
                raise ValueError(f"selection_seeds has {len(seeds)} seeds for {pixel_values.shape[0]} images")
            drop_cls = model.config.vision_feature_select_strategy == "default"
            kept, groups = baselines.select_features(model.model.vision_tower, pixel_values, _feature_layer(model),
                                                     drop_cls, state.method, state.token_budget, seeds)
            with torch.no_grad():  # one image at a time, as the eval script's rows were computed
                features = [model.model.multi_modal_projector(k) for k in kept]
            return base.EncodedImages(features, groups)
        if state.method == "tome":
            baselines.configure_tome(model.model.vision_tower, patches, state.token_budget, _feature_layer(model))
        features, patch_maps = encode_images(model, pixel_values)
        return base.EncodedImages(features, patch_maps)

    def stock_counts(self, model: nn.Module, inputs: Any) -> list[int]:
        pixel_values = inputs["pixel_values"]
        return [full_image_tokens(model, pixel_values)] * pixel_values.shape[0]

    def virtual_positions(self, model: nn.Module, prepared: base.Prepared) -> Tensor:
        return base.rope_positions(model, prepared)

    def feature_kwargs(self, encoded: base.EncodedImages) -> dict:
        return base.feature_kwargs(encoded)

    def calibration_pixels(self, model: nn.Module, processor: Any, images: list[Any]) -> Tensor:
        return processor.image_processor([load_image(i) for i in images], return_tensors="pt").pixel_values

    def refuse(self, kwargs: dict) -> None:
        return None


LLAVA = LlavaFamily()


def prepare_inputs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor
) -> base.Prepared:
    """Encode the images and lay the prompt out on the merged sequence (:func:`dymu.vlm.base.prepare_inputs`)."""
    return base.prepare_inputs(model, input_ids, attention_mask, pixel_values)


def enable_dymu(
    model: nn.Module,
    thresholds: dymu.encoders.ThresholdsLike | None = None,
    *,
    vtu: VTUMode | None = None,
    threshold_offset: float = 0.0,
    token_order: TokenOrder | None = None,
    method: Method = "dymu",
    token_budget: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Make a stock ``LlavaForConditionalGeneration`` (or a Qwen-VL model: :mod:`dymu.vlm.qwen_vl`) run DyMU (in
    place; returns the model); the family adapter is chosen by the model's class.

    ``thresholds=None`` keeps merging off (the model then reproduces the stock outputs). ``vtu`` selects
    virtual token unmerging in the language model: ``"fast"`` (default), ``"exact"``, or ``"off"`` (merged
    tokens at consecutive positions, the plain baseline; the default of ``method="prune"``/``"random"``).
    ``method``: ``"dymu"``, or a baseline of :mod:`dymu.baselines` (``"tome"``, ``"prune"``, ``"random"``) keeping
    ``token_budget`` tokens per image; ``seed``: random dropping's first image seed (image ``i`` of a call uses
    ``seed + i``, or the call's ``selection_seeds=[...]``). ``token_order`` is passed to :func:`dymu.patch`
    (``None``: the checkpoint's order; ``"authors"`` lets a lone image keep other counts than inside a
    batch, as the original code does; ``"batch"``/``"single"`` make counts independent of the batch).
    LLaVA-OneVision has its own entry, :func:`dymu.vlm.enable_dymu_onevision` (crop options, another default order).
    """
    try:
        family = base.family_of(model)
    except ValueError:
        family = None
    if family is None or family.name == "onevision":
        raise ValueError(f"enable_dymu expects a LlavaForConditionalGeneration or a Qwen-VL model, got "
                         f"{type(model).__name__}" + (": use enable_dymu_onevision" if family else ""))
    return base.enable(
        model, family, thresholds=thresholds, vtu=vtu, threshold_offset=threshold_offset,
        token_order=token_order, method=method, token_budget=token_budget, seed=seed,
        log=logging.getLogger(type(family).__module__),  # each family's counts under its own module's logger
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
    out, tokens = base.generate_with_counts(model, inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    decoded = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [Answer(text.strip(), c) for text, c in zip(decoded, tokens.counts)]


calibrate_token_budget = base.calibrate_token_budget
