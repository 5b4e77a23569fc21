"""Patching stock vision encoders with DToMe: :func:`patch`, :func:`configure`, :func:`unpatch`.

Adapters (one thin module per family) are tried in order; each returns a
:class:`~dymu.encoders.base.DToMeState` when it recognises the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from dymu.encoders import hf, hf_dinov2, qwen2_5_vl, qwen2_vl, qwen3_vl, timm_vit
from dymu.encoders import open_clip as open_clip_adapter
from dymu.encoders.base import DToMeRun, DToMeState, patched_modules, restore_class
from dymu.encoders.names import canonical_identity, is_dymu_name, parse_dymu_name, thresholds_not_found
from dymu.merge import Mode
from dymu.token_order import TokenOrder
from dymu.thresholds import ThresholdCheckpoint, finding_order, load_thresholds

ADAPTERS = [
    hf.patch_model, open_clip_adapter.patch_model, timm_vit.patch_model, hf_dinov2.patch_model,
    qwen2_vl.patch_model, qwen2_5_vl.patch_model, qwen3_vl.patch_model,
]

ThresholdsLike = ThresholdCheckpoint | Tensor | Sequence[float] | str | Path


def patch(
    model: nn.Module,
    thresholds: ThresholdsLike | None = None,
    *,
    merge_counts: Sequence[int] | None = None,
    mode: Mode | None = None,
    threshold_offset: float = 0.0,
    token_order: TokenOrder | None = None,
) -> DToMeState:
    """Make ``model``'s vision encoder merge tokens (DToMe) in every block.

    * ``thresholds`` (a checkpoint, a path to one, a DyMU name such as ``"ViT-L-14-336-tome-72out"`` whose
      checkpoint is in ``checkpoints/threshold_checkpoints/``, or ``L`` floats) → inference mode;
    * ``merge_counts`` (``L`` ints, see :func:`dymu.merge_schedule`) → threshold-finding mode, or with
      ``mode="fixed"`` fixed-count ToMe merging (every image merges ``merge_counts[l]`` tokens at block ``l``);
    * neither → merging off (stock outputs), switchable later with :func:`configure`;
    * ``token_order`` — the token order after a merge (:mod:`dymu.token_order`: which merge path each runs):
      ``"authors"`` (the default: exactly the original code), ``"batch"``/``"single"`` (one of its two paths for
      every batch: batch-invariant) or ``"raster"``. ``None`` takes the order a threshold checkpoint was found with.

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
            "(or a model containing one, e.g. LLaVA), an open_clip VisionTransformer or a timm ViT "
            "(open_clip SigLIP), a DINOv2 or a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower"
        )
    model._dymu_state = state
    try:
        configure(
            model,
            thresholds,
            merge_counts=merge_counts,
            mode=mode,
            threshold_offset=threshold_offset,
            token_order=token_order,
        )
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
    token_order: TokenOrder | None = None,
) -> DToMeState:
    """Change thresholds, merge counts, mode, threshold offset or token order of a patched model.

    A threshold checkpoint found in another token order than ``token_order`` (``"raster"`` vs the authors') gives
    other token counts than it was found for: without ``token_order`` the checkpoint's order is taken, with an
    incompatible one a warning says so.
    """
    state = get_state(model)
    source = str(thresholds) if isinstance(thresholds, (str, Path)) else "the thresholds"
    if isinstance(thresholds, (str, Path)):
        thresholds = load_thresholds(resolve_thresholds_path(thresholds))
    if isinstance(thresholds, ThresholdCheckpoint):
        ckpt = thresholds
        if ckpt.num_layers != state.num_layers:
            raise ValueError(
                f"{source} hold {ckpt.num_layers} per-layer thresholds"
                f"{f' for {ckpt.encoder!r}' if ckpt.encoder else ''}, but {state.encoder!r} has "
                f"{state.num_layers} blocks"
            )
        # authors' files use open_clip spellings; an unknown identity (renamed .pth) is checked by layer count only
        if ckpt.encoder and canonical_identity(ckpt.encoder) != state.encoder:
            raise ValueError(f"{source} are for encoder {ckpt.encoder!r}, not {state.encoder!r}")
        if token_order is None:
            if finding_order(state.token_order) != ckpt.token_order:
                token_order = "raster" if ckpt.token_order == "raster" else "authors"
        elif finding_order(token_order) != ckpt.token_order:
            warnings.warn(
                f"{source} were found in {ckpt.token_order!r} token order but are used in {token_order!r} order: "
                "token counts will differ from what they were found for (omit token_order to use the checkpoint's)",
                stacklevel=2,
            )
        thresholds = ckpt.thresholds
        state.threshold_grid = (ckpt.grid_tokens, ckpt.grid) if ckpt.grid_tokens is not None else None
    elif thresholds is not None:  # plain values: nothing recorded to check the input against
        state.threshold_grid = None
    state.configure(
        thresholds=torch.as_tensor(thresholds) if thresholds is not None else None,
        merge_counts=list(merge_counts) if merge_counts is not None else None,
        mode=mode,
        token_order=token_order,
    )
    if threshold_offset is not None:
        state.threshold_offset = float(threshold_offset)
    return state


def resolve_thresholds_path(thresholds: str | Path) -> Path:
    """A checkpoint path as given, or the default checkpoint of a DyMU name (``ViT-L-14-336-tome-72out``)."""
    path = Path(thresholds)
    if path.is_file() or not is_dymu_name(str(thresholds)):
        if not path.is_file():
            raise thresholds_not_found(str(thresholds))  # a bare encoder name, a typo (suggested), a missing file
        return path
    return parse_dymu_name(str(thresholds)).find_checkpoint()


def inspect_encoder(model: nn.Module) -> DToMeState:
    """The state :func:`patch` would create for ``model`` (identity, blocks, tokens), leaving ``model`` unpatched."""
    state = patch(model)
    unpatch(model)
    state.forward = None
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
