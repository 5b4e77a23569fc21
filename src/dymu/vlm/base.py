"""What every DyMU VLM adapter shares: the thin subclass swapped onto a stock model instance.

A family (LLaVA-1.5, LLaVA-OneVision) supplies one ``prepare(model, input_ids, attention_mask, pixel_values,
kwargs)`` that encodes the images with DToMe, collapses each image's placeholders to its merged count and returns
a :class:`Prepared` (it pops the keyword arguments it consumed). :func:`make_dymu_class` turns that into a subclass
of the stock class whose ``forward``/``generate`` run ``prepare`` first and then the *stock* method on the merged
layout, with the merged features passed through ``mm_encoder_outputs`` and VTU's batch set for the call.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dymu import vtu as vtu_lib
from dymu.vtu import CACHE_NAMES, VTUMode, check_vtu_mode

logger = logging.getLogger(__name__)


class Prepared(Protocol):
    """What ``prepare`` returns: the merged-layout inputs of the stock method."""

    input_ids: Tensor  # [B, M] left-padded, placeholders collapsed
    attention_mask: Tensor
    position_ids: Tensor | None  # virtual positions (VTU on), None to let the stock code number them
    image_features: list[Tensor]  # per image [k_i, D_text]
    vtu_batch: Any  # the VTU batch, None with VTU off


Prepare = Callable[[nn.Module, Tensor, "Tensor | None", Any, dict], Prepared]


@dataclass
class Enabled:
    """Stored on a DyMU model instance (``model._dymu``): how to undo the swap and which VTU mode runs."""

    parent: type
    vtu: VTUMode
    options: dict[str, Any]


def enabled(model: nn.Module) -> Enabled | None:
    """The DyMU settings of ``model``, or ``None`` when DyMU is not enabled on it."""
    return model.__dict__.get("_dymu")


def dymu_vtu_mode(model: nn.Module) -> VTUMode | None:
    """The VTU mode a DyMU VLM was enabled with (``"fast"``/``"exact"``/``"off"``), ``None`` for a stock model."""
    settings = enabled(model)
    return None if settings is None else settings.vtu


# keys of a checkpoint's "dymu" config block that describe its prompt format, not DyMU's settings: a block holding
# only these leaves DyMU off
PROMPT_FORMAT_KEYS = ("prompt_suffix",)


def settings_block(config: dict[str, Any]) -> dict[str, Any] | None:
    """A ``config.json``'s ``dymu`` block without its prompt-format keys; None where nothing else is in it."""
    block = config.get("dymu")
    if isinstance(block, dict):
        block = {k: v for k, v in block.items() if k not in PROMPT_FORMAT_KEYS} or None
    return block


def prompt_suffix(model: Any) -> str | None:
    """The text a checkpoint says to append to each question (``"prompt_suffix"`` in its ``dymu`` config block,
    e.g. written by :func:`dymu.small_vlm.build_small_vlm`); None where it says nothing. ``model``: a model or
    its config."""
    block = getattr(getattr(model, "config", model), "dymu", None)
    suffix = block.get("prompt_suffix") if isinstance(block, dict) else None
    if suffix is not None and not isinstance(suffix, str):
        raise ValueError(f"the 'dymu' config block's prompt_suffix must be a string, got {type(suffix).__name__}")
    return suffix


def log_counts(model: nn.Module, counts: list[int], log: logging.Logger = logger) -> None:
    """Keep the call's per-image visual token counts on ``model.dymu_last_counts`` and log them."""
    model.dymu_last_counts = counts
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


def make_dymu_class(
    parent: type, prepare: Prepare, refuse: Callable[[dict], None] | None = None, log: logging.Logger = logger
) -> type:
    """The DyMU subclass of the stock VLM class ``parent``.

    ``forward`` carries the stock signature (``__signature__``), so ``generate`` sees what the stock model accepts:
    it passes ``logits_to_keep=1`` at prefill and numbers positions from the attention mask when ``prepare``
    gives none. ``refuse(kwargs)`` raises for inputs DyMU does not handle (e.g. video); it runs on every call.
    Each call's visual token counts are logged to ``log`` (the family's logger).
    Calls without images, and decode steps, go to the stock method unchanged.
    """
    stock_forward = inspect.signature(parent.forward)

    class DyMUModel(parent):
        def _dymu_call(self, method, input_ids, pixel_values, attention_mask, kwargs):
            """Encode, collapse the placeholders, then run the stock ``method`` on the merged layout under VTU."""
            if kwargs.get("mm_encoder_outputs") is not None:
                raise ValueError("give pixel_values or mm_encoder_outputs, not both")
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError("DyMU needs input_ids (to find the image placeholders), not inputs_embeds")
            prep = prepare(self, input_ids, attention_mask, pixel_values, kwargs)
            log_counts(self, [int(f.shape[0]) for f in prep.image_features], log)
            if prep.position_ids is not None:
                kwargs["position_ids"] = prep.position_ids
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=prep.image_features)}
            with vtu_lib.vtu_context(prep.vtu_batch):
                out = method(input_ids=prep.input_ids, attention_mask=prep.attention_mask, **kwargs)
            return prep, out

        def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
            if refuse is not None:
                refuse(kwargs)
            if pixel_values is None or input_ids is None:
                return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
            cache = next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("pixel_values with a non-empty cache: DyMU encodes images only at prefill")
            prep, out = self._dymu_call(super().forward, input_ids, pixel_values, attention_mask, kwargs)
            out["visual_token_counts"] = [int(f.shape[0]) for f in prep.image_features]
            return out

        forward.__signature__ = stock_forward  # what generate inspects (logits_to_keep, position_ids, ...)

        def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
            if refuse is not None:
                refuse(kwargs)
            if pixel_values is None or input_ids is None:
                return super().generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
            prep, out = self._dymu_call(super().generate, input_ids, pixel_values, attention_mask, kwargs)
            return with_caller_prompt(out, input_ids, prep.input_ids.shape[1])

    DyMUModel.__qualname__ = DyMUModel.__name__ = f"DyMU{parent.__name__}"
    return DyMUModel


def enable(
    model: nn.Module,
    prepare: Prepare,
    *,
    thresholds: Any,
    vtu: VTUMode,
    threshold_offset: float,
    token_order: Any,
    refuse: Callable[[dict], None] | None = None,
    log: logging.Logger = logger,
    undo_hint: str = "disable_dymu",
    **options: Any,
) -> nn.Module:
    """Patch the vision tower with DToMe, turn VTU on in the language model and swap in the DyMU class.

    Either everything is enabled or nothing (a failure leaves the stock model). ``options`` are the family's
    settings, kept on ``enabled(model).options``.
    """
    import dymu

    check_vtu_mode(vtu, "vtu")
    if enabled(model) is not None:
        raise ValueError(f"DyMU is already enabled on this model; call {undo_hint} first")
    tower = model.model.vision_tower
    dymu.patch(tower, thresholds, threshold_offset=threshold_offset, token_order=token_order)
    try:
        if vtu != "off":
            vtu_lib.enable_vtu(model, vtu)
    except Exception:
        dymu.unpatch(tower)
        raise
    parent = model.__class__
    model.__class__ = make_dymu_class(parent, prepare, refuse, log)
    model._dymu = Enabled(parent, vtu, options)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: stock class, tower and attention implementation (a stock model is returned as is)."""
    import dymu

    settings = model.__dict__.pop("_dymu", None)
    if settings is None:
        return model
    if settings.vtu != "off":
        vtu_lib.disable_vtu(model)
    dymu.unpatch(model.model.vision_tower)
    model.__class__ = settings.parent
    for name in ("dymu_last_counts", "dymu_last_crop_counts", "dymu_last_inputs"):
        model.__dict__.pop(name, None)
    return model
