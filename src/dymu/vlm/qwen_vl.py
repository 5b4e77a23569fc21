"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL with DyMU, on transformers' own classes (one adapter of :mod:`dymu.vlm.base`).

:func:`enable_dymu_qwen` turns a stock ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``
or ``Qwen3VLForConditionalGeneration`` into a DyMU model in place. The three differ here only in the DeepStack
features of Qwen3-VL; everything else is the one VLM path of :mod:`dymu.vlm.base`:

* **encode** runs the patched tower (:mod:`dymu.encoders.qwen_vl`: whole 2×2 units merged within frames/windows)
  on the processor's packed patches and ``image_grid_thw``; each image's *groups* are the tower's source map over
  its merged grid (one cell per stock placeholder, raster order), so the processor's ``t·h·w / 4`` placeholders
  collapse to the merged count and ``mm_token_type_ids`` with them (``token_aligned``). DeepStack features come out
  of the tower with the same groups and enter the LLM at the merged slots (``visual_pos_masks`` is the stock one,
  over the collapsed ids).
* **positions**: the stock ``get_rope_index`` runs on the *unmerged* sequence (the merged row expanded by its groups,
  which is the caller's row) and the image grids, so every virtual token takes its stock ``(t, h, w)`` and the text
  after an image continues at exactly the stock positions; VTU (:mod:`dymu.vtu.mrope`) rotates each copy there.
  ``generate`` receives the 4-row ids (text row + t, h, w of each slot's representative, the last slot's being the
  last virtual position) and continues decoding at the stock positions; the cache holds the merged length.
* **VTU off** (the selections, or ``vtu="off"``): each merged token at its representative's stock ``(t, h, w)``
  (the first position it covers), the positions the pruning peers keep for Qwen-VL.
* **baselines**: ``tome`` is the tower in fixed-count mode (each frame merges ``cells - token_budget`` units);
  ``prune``/``random`` run the stock tower and keep ``token_budget`` merger outputs per image (:func:`select_units`).

Video is refused (``pixel_values_videos``): the tower merges frames but the VLM path is written for images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import dymu
from dymu import baselines
from dymu.vlm import base
from dymu.vlm.llava import enable_dymu
from dymu.vtu import prepare_vtu

MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


@dataclass
class QwenEncoded(base.EncodedImages):
    """:class:`base.EncodedImages` plus the images' grids (the stock ``get_rope_index`` needs them)."""

    grid_thw: Tensor | None = None


def stock_image_counts(grid_thw: Tensor, merge_size: int) -> list[int]:
    """The processor's placeholder count per image: ``t·h·w / merge²``."""
    return (grid_thw.prod(-1) // merge_size**2).tolist()


@torch.no_grad()
def select_units(features: list[Tensor], method: str, count: int, seeds: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Keep ``count`` merger outputs per image (all when fewer), in raster order: ``"prune"`` those of largest L2
    norm (Qwen's towers have no CLS token to attend from; feature norm is the attention-free saliency the pruning
    peers fall back to), ``"random"`` a seeded subset. Returns per image the kept indices and the groups (each
    stock position to the nearest kept token before it, as :func:`dymu.baselines.selection_groups`)."""
    kept, groups = [], []
    for f, seed in zip(features, seeds):
        n = f.shape[0]
        k = min(count, n)
        if method == "prune":
            keep = f.float().norm(dim=-1).topk(k).indices.sort().values
        else:
            keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
        kept.append(keep.to(f.device))
        groups += baselines.selection_groups([keep], n)
    return kept, groups


class QwenFamily:
    """The Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapter (module docstring)."""

    token_aligned: tuple[str, ...] = ("mm_token_type_ids",)

    def __init__(self, name: str) -> None:
        self.name = name
        self.model_class = MODEL_CLASSES[name]

    def encode(self, model: nn.Module, pixel_values: Tensor, kwargs: dict, state: base.VLMState) -> QwenEncoded:
        grid = kwargs.pop("image_grid_thw", None)
        seeds = kwargs.pop("selection_seeds", None)
        if grid is None:
            raise ValueError("pixel_values need image_grid_thw (the processor returns both), got none")
        tower = model.model.visual
        merge = tower.spatial_merge_size
        cells = stock_image_counts(grid, merge)
        if pixel_values.shape[0] != int(grid.prod(-1).sum()):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} patches but image_grid_thw "
                             f"{grid.tolist()} needs {int(grid.prod(-1).sum())}")
        if state.method == "tome":
            return self._encode_tome(tower, pixel_values, grid, state.token_budget)
        with torch.no_grad():
            out = tower(pixel_values.to(tower.dtype), grid_thw=grid)
        if state.method in baselines.SELECTIONS:
            seeds = [state.seed + i for i in range(len(cells))] if seeds is None else list(seeds)
            if len(seeds) != len(cells):
                raise ValueError(f"selection_seeds has {len(seeds)} seeds for {len(cells)} images")
            feats = list(out.pooler_output.split(cells))
            keep, groups = select_units(feats, state.method, state.token_budget, seeds)
            deep = [list(d.split(cells)) for d in getattr(out, "deepstack_features", None) or []]
            extras = {}
            if deep:  # the kept tokens' DeepStack features, same selection
                extras["deepstack"] = [torch.stack([d[i][k] for d in deep]) for i, k in enumerate(keep)]
            return QwenEncoded([f[k] for f, k in zip(feats, keep)], groups, extras=extras, grid_thw=grid)
        return self._merged(dymu.get_state(tower).images, grid)

    def _encode_tome(self, tower: nn.Module, pixel_values: Tensor, grid: Tensor, budget: int) -> QwenEncoded:
        """Fixed-count ToMe: one tower call per image, each merging ``cells - budget`` units over the blocks (the
        tower's fixed mode counts per frame, and images of a call differ in size)."""
        images = []
        for patches, g in zip(pixel_values.split(grid.prod(-1).tolist()), grid.split(1)):
            cells = stock_image_counts(g, tower.spatial_merge_size)[0]
            baselines.configure_tome(tower, cells, min(budget, cells))
            with torch.no_grad():
                tower(patches.to(tower.dtype), grid_thw=g)
            images += dymu.get_state(tower).images
        return self._merged(images, grid)

    def _merged(self, images: list, grid: Tensor) -> QwenEncoded:
        extras = {}
        if images and images[0].deepstack:
            extras["deepstack"] = [torch.stack(m.deepstack) for m in images]  # [layers, k, D] per image
        return QwenEncoded([m.features for m in images], [m.source_map for m in images], extras=extras,
                           grid_thw=grid)

    def feature_kwargs(self, enc: base.EncodedImages) -> dict:
        """The merged features (and DeepStack features, same slots) as ``mm_encoder_outputs``."""
        out = base.feature_kwargs(enc)
        deep = enc.extras.get("deepstack")
        if deep:
            out["mm_encoder_outputs"]["image"]["deepstack_features"] = [
                tuple(d[layer] for d in deep) for layer in range(deep[0].shape[0])
            ]
        return out

    def stock_counts(self, model: nn.Module, inputs: Any) -> list[int]:
        return stock_image_counts(inputs["image_grid_thw"], model.model.visual.spatial_merge_size)

    def unmerged_positions(self, model: nn.Module, prepared: base.Prepared) -> list[Tensor]:
        """Per row ``[3, N_b]``: the stock ``get_rope_index`` on the row's virtual (unmerged) sequence."""
        image_id = model.config.image_token_id
        grid = prepared.encoded.grid_thw
        image = 0
        positions = []
        for b, groups in enumerate(prepared.groups):
            merged = prepared.input_ids[b][prepared.attention_mask[b].bool()]
            ids = merged[groups.to(merged.device)][None]
            runs = int(torch.unique_consecutive(ids[0] == image_id, return_counts=True)[0].sum())
            # one image per run of placeholders: the processor never puts two images side by side without text
            rows = model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_id).int(),
                                              image_grid_thw=grid[image:image + runs].to(ids.device))[0]
            image += runs
            positions.append(rows[:, 0])
        return positions

    def virtual_positions(self, model: nn.Module, prepared: base.Prepared) -> Tensor:
        """``[4, B, M]`` M-RoPE ids: with VTU on, those of a VTU batch rebuilt with the unmerged positions; with VTU
        off, each merged token at its representative's stock ``(t, h, w)`` (no unmerging)."""
        merged = [int(m.sum()) for m in prepared.attention_mask]
        batch = prepare_vtu(prepared.groups, positions=self.unmerged_positions(model, prepared),
                            padding_side="left", num_merged=merged)
        if prepared.vtu_batch is not None:
            prepared.vtu_batch = batch
        return batch.model_position_ids

    def calibration_pixels(self, model: nn.Module, processor: Any, images: list[Any]) -> Tensor:
        raise ValueError("token-budget calibration is not available for Qwen-VL models (dynamic resolution): "
                         "use thresholds found with `dymu thresholds`, or method='tome' with token_budget")

    def refuse(self, kwargs: dict) -> None:
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("DyMU on Qwen-VL models takes images only: pixel_values_videos is not supported")


FAMILIES = {name: QwenFamily(name) for name in MODEL_CLASSES}


def family_for(model: nn.Module) -> QwenFamily | None:
    """The Qwen adapter of ``model`` (by ``config.model_type``), ``None`` for other models."""
    return FAMILIES.get(getattr(model.config, "model_type", None))


def enable_dymu_qwen(
    model: nn.Module, thresholds: dymu.encoders.ThresholdsLike | None = None, **settings: Any
) -> nn.Module:
    """Make a stock Qwen2-VL / Qwen2.5-VL / Qwen3-VL model run DyMU (in place; returns the model).

    :func:`dymu.vlm.enable_dymu` (the one entry, which picks this adapter by the model's class) after checking that
    ``model`` is a Qwen-VL model; keyword arguments as there (``vtu``, ``threshold_offset``, ``token_order``,
    ``method``, ``token_budget``, ``seed``). ``thresholds=None`` keeps merging off (the stock outputs),
    ``token_budget`` counts tokens per image for the baselines."""
    family = family_for(model)
    if family is None or family.model_class not in {c.__name__ for c in type(model).__mro__}:
        raise ValueError(f"enable_dymu_qwen expects one of {', '.join(MODEL_CLASSES.values())}, "
                         f"got {type(model).__name__}")
    return enable_dymu(model, thresholds, **settings)


def disable_dymu_qwen(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_dymu_qwen`."""
    return base.disable(model)

