"""Patch stock vision encoders with DToMe: ``dymu.patch(model, thresholds=…)`` / ``dymu.unpatch(model)``.

Adapters (one thin module per family) are tried in order; each returns a
:class:`~dymu.encoders.base.DToMeState` when it recognises the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from dymu.encoders import hf
from dymu.encoders.base import DToMeRun, DToMeState, patched_modules, restore_class
from dymu.merge import Mode
from dymu.thresholds import ThresholdCheckpoint, load_thresholds

ADAPTERS = [hf.patch_model]

ThresholdsLike = ThresholdCheckpoint | Tensor | Sequence[float] | str | Path


def patch(
    model: nn.Module,
    thresholds: ThresholdsLike | None = None,
    *,
    merge_counts: Sequence[int] | None = None,
    mode: Mode | None = None,
    threshold_offset: float = 0.0,
) -> DToMeState:
    """Make ``model``'s vision encoder merge tokens (DToMe) in every block.

    * ``thresholds`` (a checkpoint, a path to one, or ``L`` floats) → inference mode;
    * ``merge_counts`` (``L`` ints, see :func:`dymu.merge_schedule`) → threshold-finding mode;
    * neither → merging off (stock outputs), switchable later with :func:`configure`.

    Returns the state object, also reachable as :func:`get_state`. Undo with :func:`unpatch`.
    """
    if hasattr(model, "_dymu_state"):
        raise ValueError("model is already patched by dymu; call dymu.unpatch(model) first")
    for adapter in ADAPTERS:
        state = adapter(model)
        if state is not None:
            break
    else:
        raise ValueError(
            f"no DToMe adapter for {type(model).__name__}: expected a transformers CLIP/SigLIP vision model "
            "(or a model containing one, e.g. LLaVA) or an open_clip VisionTransformer"
        )
    model._dymu_state = state
    try:
        configure(model, thresholds, merge_counts=merge_counts, mode=mode, threshold_offset=threshold_offset)
    except Exception:
        unpatch(model)
        raise
    return state


def configure(
    model: nn.Module,
    thresholds: ThresholdsLike | None = None,
    *,
    merge_counts: Sequence[int] | None = None,
    mode: Mode | None = None,
    threshold_offset: float | None = None,
) -> DToMeState:
    """Change thresholds, merge counts, mode or threshold offset of a patched model."""
    state = get_state(model)
    if thresholds is not None and not isinstance(thresholds, Tensor) and isinstance(thresholds, (str, Path)):
        thresholds = load_thresholds(thresholds)
    if isinstance(thresholds, ThresholdCheckpoint):
        thresholds = thresholds.check(encoder=state.encoder, num_layers=state.num_layers).thresholds
    state.configure(
        thresholds=torch.as_tensor(thresholds) if thresholds is not None else None,
        merge_counts=list(merge_counts) if merge_counts is not None else None,
        mode=mode,
    )
    if threshold_offset is not None:
        state.threshold_offset = float(threshold_offset)
    return state


def get_state(model: nn.Module) -> DToMeState:
    state = getattr(model, "_dymu_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by dymu; call dymu.patch(model, ...) first")
    return state


def last_run(model: nn.Module) -> DToMeRun:
    """Sizes, source maps and found thresholds of the last forward pass."""
    return get_state(model).run


def unpatch(model: nn.Module) -> None:
    """Restore every patched module's class and remove dymu's hooks."""
    state = model.__dict__.pop("_dymu_state", None)
    if state is not None:
        for handle in state.hooks:
            handle.remove()
    for module in list(patched_modules(model)):
        restore_class(module)


__all__ = ["patch", "unpatch", "configure", "get_state", "last_run", "DToMeState", "DToMeRun"]
