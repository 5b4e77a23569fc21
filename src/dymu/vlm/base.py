"""The one VLM path: a family adapter says how its images become merged visual tokens; everything else is here.

A family (LLaVA-1.5 in :mod:`dymu.vlm.llava`, LLaVA-OneVision in :mod:`dymu.vlm.onevision`) is a :class:`Family`:

* ``encode(model, pixel_values, kwargs, state)`` → :class:`EncodedImages`: per image its projected merged features
  (slot order) and its *groups*, ``groups[i][p]`` = the merged slot standing for the image's stock placeholder
  position ``p``; so ``groups[i].numel()`` is the image's stock placeholder count and ``max + 1`` its merged count
  (per-crop counts ride along for multi-crop families). It pops the stock keyword arguments it consumed;
* ``stock_counts(model, inputs)``: the placeholder count per image of the stock model (what a caller compares with);
* ``virtual_positions(model, prepared)``: the position ids of the merged sequence (the default,
  :func:`rope_positions`, is 1-D RoPE: with VTU on each slot at the virtual positions its groups give, with VTU off
  the rule below);
* ``feature_kwargs(encoded)``: how the merged features reach the stock call (default :func:`feature_kwargs`:
  ``mm_encoder_outputs``).

Written once, here: collapsing each image's placeholders to its merged count (:func:`collapse_placeholders`),
the merged-layout inputs and VTU batch (:func:`prepare_inputs`), VTU-off positions, the swapped-in subclass whose
``forward``/``generate`` run the stock methods on the merged layout (:func:`make_dymu_class`), enable/disable and
the token-budget calibration (:func:`calibrate_token_budget`). Baselines (:mod:`dymu.baselines`) plug in through
:class:`VLMState` (``method``/``token_budget``), read by the family's ``encode``: ToMe is its own DToMe tower in
fixed-count mode; pruning and random dropping select patches of the stock tower (:func:`dymu.baselines.select_features`).

**VTU off** passes explicit positions for every family: the merged tokens numbered from the attention mask
(``cumsum - 1``), what ``generate`` builds, so forward, generate and batch-of-one agree on left-padded rows. (LLaVA
used to pass ``None``; transformers 5.24's stock forward numbers such rows the same way, but an explicit rule does
not depend on that, and M-RoPE families return theirs through the same hook.)

**Counts come back with the call**: ``forward``'s output carries ``visual_token_counts`` (per image),
``crop_token_counts`` (per image, per crop; ``None`` for single-crop families) and ``merged_attention_mask`` (the
layout its logits are on); ``generate(..., return_dict_in_generate=True)`` carries the same counts on its output.
:func:`generate_with_counts` does that for callers that want the sequences and a :class:`VisualTokens` record.

**Qwen2-VL / Qwen2.5-VL / Qwen3-VL** (:mod:`dymu.vlm.qwen_vl`): groups over the processor's placeholders,
DeepStack features in ``EncodedImages.extras`` (same slots) passed by its ``feature_kwargs``, ``mm_token_type_ids``
collapsed with the ids, ``[4, B, M]`` M-RoPE ids from the stock ``get_rope_index`` on the *unmerged* sequence.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

import dymu
from dymu import vtu as vtu_lib
from dymu.baselines import Method, check_method
from dymu.vtu import CACHE_NAMES, VTUMode, check_vtu_mode

logger = logging.getLogger(__name__)


@dataclass
class EncodedImages:
    """What a family's ``encode`` returns, per image of the call."""

    features: list[Tensor]  # [k_i, D_text]: the merged visual tokens, in slot order
    groups: list[Tensor]  # [n_stock_i] long: stock placeholder position -> local slot (0..k_i-1)
    crop_counts: list[list[int]] | None = None  # tokens kept per crop (multi-crop families)
    extras: dict[str, list[Tensor]] = field(default_factory=dict)  # per image, same slots (e.g. DeepStack)

    @property
    def counts(self) -> list[int]:
        return [int(f.shape[0]) for f in self.features]


@dataclass
class VisualTokens:
    """The visual tokens of one call: per image, and per crop for multi-crop families."""

    counts: list[int]
    crop_counts: list[list[int]] | None = None


@dataclass
class Prepared:
    """Merged-layout inputs of the stock method, plus what VTU needs."""

    input_ids: Tensor  # [B, M] left-padded, each image's placeholders collapsed to its merged count
    attention_mask: Tensor  # [B, M]
    position_ids: Tensor  # [B, M] (or [R, B, M] for M-RoPE): virtual positions, or cumsum with VTU off
    groups: list[Tensor]  # per row: virtual position -> merged slot
    kept: list[Tensor]  # per row: index into the caller's unpadded row of each merged token
    vtu_batch: vtu_lib.VTUBatch | None
    encoded: EncodedImages


@dataclass
class VLMState:
    """Stored on a DyMU VLM instance (``model._dymu_vlm``): the family, how to undo the swap, the settings."""

    family: "Family"
    parent: type
    vtu: VTUMode
    method: Method = "dymu"
    token_budget: int | None = None  # tokens per image (per crop for multi-crop families) of the baselines
    seed: int = 0  # random dropping
    options: dict[str, Any] = field(default_factory=dict)  # the family's own settings


class Family(Protocol):
    """A VLM family adapter (see the module docstring)."""

    name: str
    model_class: str  # the stock class name, for error messages
    token_aligned: tuple[str, ...]  # per-token keyword tensors collapsed like input_ids

    def encode(self, model: nn.Module, pixel_values: Any, kwargs: dict, state: VLMState) -> EncodedImages: ...
    def stock_counts(self, model: nn.Module, inputs: Any) -> list[int]: ...
    def virtual_positions(self, model: nn.Module, prepared: Prepared) -> Tensor: ...
    def feature_kwargs(self, encoded: EncodedImages) -> dict: ...
    def calibration_pixels(self, model: nn.Module, processor: Any, images: list[Any]) -> Tensor: ...
    def refuse(self, kwargs: dict) -> None: ...


def vlm_state(model: nn.Module) -> VLMState | None:
    """The DyMU state of ``model``, or ``None`` when DyMU is not enabled on it."""
    return model.__dict__.get("_dymu_vlm")


def dymu_vtu_mode(model: nn.Module) -> VTUMode | None:
    """The VTU mode a DyMU VLM was enabled with (``"fast"``/``"exact"``/``"off"``), ``None`` for a stock model."""
    state = vlm_state(model)
    return None if state is None else state.vtu


def rope_positions(model: nn.Module, prepared: Prepared) -> Tensor:
    """1-D RoPE: the VTU batch's positions (each slot at the virtual positions of its groups); VTU off: the merged
    tokens numbered from the attention mask (already in ``prepared``)."""
    return prepared.position_ids if prepared.vtu_batch is None else prepared.vtu_batch.position_ids


def collapse_placeholders(
    input_ids: Tensor, attention_mask: Tensor | None, image_token_id: int, groups: list[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per row: merged token ids, the row's groups and ``kept`` (index in the unpadded row of each merged token).

    Images take their placeholders in order: image ``i`` consumes ``groups[i].numel()`` placeholder tokens (its stock
    count) and leaves ``max(groups[i]) + 1``; a lone placeholder stands for a whole image (the original LLaVA's
    unexpanded ``<image>``). The virtual sequence is the row as the stock model sees it.
    """
    stock = [g.numel() for g in groups]
    merged_counts = [int(g.max()) + 1 for g in groups]
    rows, row_groups, kept = [], [], []
    image = 0
    for b in range(input_ids.shape[0]):
        real = torch.arange(input_ids.shape[1], device=input_ids.device)
        if attention_mask is not None:
            real = real[attention_mask[b].bool()]
        ids = input_ids[b][real]
        values, lengths = torch.unique_consecutive(ids == image_token_id, return_counts=True)
        index, parts, position = [], [], 0
        for is_image, length in zip(values.tolist(), lengths.tolist()):
            if not is_image:
                index.append(torch.arange(position, position + length))
                parts.append(length)
            left = length if is_image else 0
            while left > 0:
                if image >= len(groups):
                    raise ValueError(
                        f"row {b} holds more image placeholders than the {len(groups)} images given "
                        f"({left} placeholder tokens left over)"
                    )
                if left != 1 and stock[image] > left:
                    raise ValueError(
                        f"row {b} has a run of {length} image tokens but image {image} needs {stock[image]} "
                        "placeholder tokens (the processor's expansion of <image>) or a single <image>"
                    )
                start = position + length - left
                index.append(torch.full((merged_counts[image],), start) + torch.arange(merged_counts[image]).clamp(max=left - 1))
                parts.append(groups[image].cpu())
                left -= stock[image] if left != 1 else 1
                image += 1
            position += length
        rows_index = torch.cat(index)
        kept.append(real[rows_index.to(real.device)])
        rows.append(ids[rows_index.to(ids.device)])
        row_groups.append(vtu_lib.concat_groups(parts))
    if image != len(groups):
        raise ValueError(
            f"{len(groups)} images were given but the prompts hold placeholders for {image}: "
            "each image needs an <image> token in its prompt"
        )
    return rows, row_groups, kept


def prepare_inputs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Any, kwargs: dict | None = None
) -> Prepared:
    """Encode the images with the family's adapter and lay the prompts out on the merged sequence (left-padded).

    ``kwargs``: the call's other keyword arguments; the family pops those it consumed, and the family's
    ``token_aligned`` tensors are replaced by their collapsed rows.
    """
    state = vlm_state(model)
    if state is None:
        raise ValueError("DyMU is not enabled on this model: call enable_dymu / dymu.vlm.load first")
    kwargs = {} if kwargs is None else kwargs
    config = model.config
    if not bool((input_ids == config.image_token_id).any()):
        raise ValueError(
            f"pixel_values were given but no prompt holds the image token (id {config.image_token_id}); "
            "put '<image>' in the prompt (the chat template does this for {'type': 'image'} content)"
        )
    enc = state.family.encode(model, pixel_values, kwargs, state)
    rows, groups, kept = collapse_placeholders(input_ids, attention_mask, config.image_token_id, enc.groups)
    pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0
    batch = vtu_lib.prepare_vtu(groups, padding_side="left", num_merged=[r.shape[0] for r in rows])
    ids = batch.pad(rows, value=pad)
    mask = batch.attention_mask.to(ids.device)
    for name in state.family.token_aligned:
        if kwargs.get(name) is not None:
            kwargs[name] = batch.pad([kwargs[name][b][k] for b, k in enumerate(kept)], value=0)
    prepared = Prepared(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), groups, kept, None, enc)
    if state.vtu != "off":
        prepared.vtu_batch = batch
    prepared.position_ids = state.family.virtual_positions(model, prepared).to(ids.device)
    return prepared


def log_counts(counts: list[int], log: logging.Logger = logger) -> None:
    t = torch.tensor(counts, dtype=torch.float32)
    std = float(t.std()) if len(counts) > 1 else 0.0
    log.info("DyMU visual tokens per image: %.1f ± %.1f (%s)", float(t.mean()), std, counts)


def with_caller_prompt(out: Any, input_ids: Tensor, merged_length: int) -> Any:
    """``generate``'s output with the caller's prompt (placeholders expanded, as given) + the new tokens, as the
    stock model returns it; ``merged_length`` is the length of the collapsed prompt generate ran on."""
    sequences = out if isinstance(out, Tensor) else out.sequences
    full = torch.cat([input_ids.to(sequences.device), sequences[:, merged_length:]], dim=1)
    if isinstance(out, Tensor):
        return full
    out.sequences = full
    return out


def feature_kwargs(enc: EncodedImages) -> dict:
    """The merged features as the stock call takes them (``mm_encoder_outputs``)."""
    return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=enc.features)}}


def make_dymu_class(parent: type, family: Family, log: logging.Logger = logger) -> type:
    """The DyMU subclass of the stock VLM class ``parent``.

    ``forward`` carries the stock signature (``__signature__``), so ``generate`` sees what the stock model accepts:
    it passes ``logits_to_keep=1`` at prefill. ``family.refuse(kwargs)`` raises for inputs the family does not
    handle (e.g. video). Calls without images, and decode steps, go to the stock method unchanged.
    """
    stock_forward = inspect.signature(parent.forward)

    class DyMUModel(parent):
        def _dymu_call(self, method, input_ids, pixel_values, attention_mask, kwargs):
            """Encode, collapse the placeholders, then run the stock ``method`` on the merged layout under VTU."""
            if kwargs.get("mm_encoder_outputs") is not None:
                raise ValueError("give pixel_values or mm_encoder_outputs, not both")
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError("DyMU needs input_ids (to find the image placeholders), not inputs_embeds")
            prep = prepare_inputs(self, input_ids, attention_mask, pixel_values, kwargs)
            log_counts(prep.encoded.counts, log)
            if prep.vtu_batch is not None or kwargs.get("position_ids") is None:
                kwargs["position_ids"] = prep.position_ids
            kwargs.update(family.feature_kwargs(prep.encoded))
            with vtu_lib.vtu_context(prep.vtu_batch):
                out = method(input_ids=prep.input_ids, attention_mask=prep.attention_mask, **kwargs)
            return prep, out

        def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
            family.refuse(kwargs)
            if pixel_values is None or input_ids is None:
                return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
            cache = next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("pixel_values with a non-empty cache: DyMU encodes images only at prefill")
            prep, out = self._dymu_call(super().forward, input_ids, pixel_values, attention_mask, kwargs)
            out["visual_token_counts"] = prep.encoded.counts
            out["crop_token_counts"] = prep.encoded.crop_counts
            out["merged_attention_mask"] = prep.attention_mask
            return out

        forward.__signature__ = stock_forward  # what generate inspects (logits_to_keep, position_ids, ...)

        def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
            family.refuse(kwargs)
            if pixel_values is None or input_ids is None:
                return super().generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
            prep, out = self._dymu_call(super().generate, input_ids, pixel_values, attention_mask, kwargs)
            out = with_caller_prompt(out, input_ids, prep.input_ids.shape[1])
            if not isinstance(out, Tensor):  # return_dict_in_generate: the counts come back with the output
                out["visual_token_counts"] = prep.encoded.counts
                out["crop_token_counts"] = prep.encoded.crop_counts
            return out

    DyMUModel.__qualname__ = DyMUModel.__name__ = f"DyMU{parent.__name__}"
    return DyMUModel


def generate_with_counts(model: nn.Module, inputs: Any, **generate_kwargs: Any) -> tuple[Tensor, VisualTokens]:
    """``model.generate(**inputs, ...)``'s sequences and the call's :class:`VisualTokens` (a stock model: its
    placeholder counts, from the family that matches it)."""
    generate_kwargs["return_dict_in_generate"] = True
    out = model.generate(**inputs, **generate_kwargs)
    counts = getattr(out, "visual_token_counts", None)
    if counts is None:
        counts = family_of(model).stock_counts(model, inputs) if "pixel_values" in inputs else []
    return out.sequences, VisualTokens(list(counts), getattr(out, "crop_token_counts", None))


def vision_tower(model: nn.Module) -> nn.Module:  # Qwen-VL calls it ``visual``
    return model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower


def family_of(model: nn.Module) -> Family:
    """The adapter of a (stock or DyMU) VLM, by its stock class."""
    from dymu.vlm.llava import LLAVA  # a cycle: the adapters import this module
    from dymu.vlm.onevision import ONEVISION
    from dymu.vlm.qwen_vl import FAMILIES as QWEN

    state = vlm_state(model)
    if state is not None:
        return state.family
    names = {c.__name__ for c in type(model).__mro__}
    for family in (ONEVISION, LLAVA, *QWEN.values()):
        if family.model_class in names:
            return family
    raise ValueError(f"no DyMU VLM family for {type(model).__name__}: expected LLaVA-1.5, LLaVA-OneVision or Qwen-VL")


def enable(
    model: nn.Module,
    family: Family,
    *,
    thresholds: Any,
    vtu: VTUMode | None,
    threshold_offset: float,
    token_order: Any,
    method: Method = "dymu",
    token_budget: int | None = None,
    seed: int = 0,
    log: logging.Logger = logger,
    undo_hint: str = "disable_dymu",
    **options: Any,
) -> nn.Module:
    """Patch the vision tower with DToMe (DyMU, ToMe), turn VTU on in the language model and swap in the DyMU
    class. ``vtu=None``: ``"fast"`` for the merging methods, ``"off"`` for the selections (a dropped patch has no
    token standing for it). Either everything is enabled or nothing (a failure leaves the stock model)."""
    vtu = check_method(method, token_budget, thresholds, vtu)
    check_vtu_mode(vtu, "vtu")
    if vlm_state(model) is not None:
        raise ValueError(f"DyMU is already enabled on this model; call {undo_hint} first")
    tower = vision_tower(model)
    merges = method in ("dymu", "tome")
    if merges:
        dymu.patch(tower, thresholds, threshold_offset=threshold_offset, token_order=token_order)
    try:
        if vtu != "off":
            vtu_lib.enable_vtu(model, vtu)
    except Exception:
        if merges:
            dymu.unpatch(tower)
        raise
    parent = model.__class__
    model.__class__ = make_dymu_class(parent, family, log)
    model._dymu_vlm = VLMState(family, parent, vtu, method, token_budget, seed, options)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: stock class, tower and attention implementation (a stock model is returned as is)."""
    state = model.__dict__.pop("_dymu_vlm", None)
    if state is None:
        return model
    if state.vtu != "off":
        vtu_lib.disable_vtu(model)
    if state.method in ("dymu", "tome"):
        dymu.unpatch(vision_tower(model))
    model.__class__ = state.parent
    return model


@torch.no_grad()
def calibrate_token_budget(model: nn.Module, processor: Any, images: list[Any], target: float) -> float:
    """Set the tower's threshold offset so that ``images`` keep ``target`` visual tokens on average (per crop for
    multi-crop families, the ``K`` of a ``-<K>out`` name); the offset stays set and is returned."""
    state = vlm_state(model)
    tower = vision_tower(model)
    if state is None or state.method != "dymu" or dymu.get_state(tower).mode != "infer":
        raise ValueError("a token budget needs thresholds: load the model with DyMU thresholds first")
    param = next(tower.parameters())
    pixels = state.family.calibration_pixels(model, processor, images).to(param.device, param.dtype)
    return dymu.calibrate_budget(tower, pixels, target, layer=model.config.vision_feature_layer).offset
