"""DToMe for transformers' Qwen2-VL vision tower (``Qwen2VisionTransformerPretrainedModel``, or a model that
contains one, e.g. ``Qwen2VLForConditionalGeneration``).

Whole 2×2 units merge within each frame (design: :mod:`dymu.encoders.qwen_vl`, docs/qwen_vl.md). After a forward,
``dymu.get_state(model).images`` holds each image's merged tokens, source map and sizes; ``pooler_output`` is
their concatenation, image by image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dymu.encoders.base import first_instance, require_bias_attention, swap_class
from dymu.encoders.qwen_vl import (
    QwenDToMeState,
    UnitPass,
    checked_call,
    image_cells,
    keys_of_qkv,
    make_block,
    patchify,
    pooled_output,
    running,
    tower_identity,
)


def make_tower(parent: type) -> type:
    class DToMeQwen2VisionTower(parent):
        """Follows ``Qwen2VisionTransformerPretrainedModel.forward``. Changes: the blocks get ``cu_seqlens`` and
        cos/sin from the unit pass (they follow the merges); ``pooler_output`` is each image's merged units after
        the merger, in raster order of their first cell (the stock order when nothing merged)."""

        def forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs):
            position_ids, frames = checked_call(self, grid_thw, kwargs)
            hidden_states = self.patch_embed(hidden_states)
            cells = image_cells(grid_thw, self.spatial_merge_size)
            state = self._dymu_dtome_state
            units = UnitPass(state, hidden_states, position_ids, frames.diff().long(),
                             torch.arange(len(frames) - 1, device=frames.device),
                             torch.arange(sum(cells), device=frames.device), cells,
                             lambda pos: self.rotary_pos_emb(hidden_states, pos), self.spatial_merge_size**2)
            with running(state, units):
                for blk in self.blocks:
                    hidden_states = blk(hidden_states, cu_seqlens=units.cu_seqlens, max_seqlen=units.max_seqlen,
                                        position_embeddings=units.position_embeddings)
                images = units.split_images(self.merger(hidden_states), [])
            return pooled_output(state, hidden_states, images)

    return DToMeQwen2VisionTower


def patch_tower(tower: nn.Module, family: str, tower_factory, num_heads: int) -> QwenDToMeState:
    """Swap the tower's and its blocks' classes (shared by the three Qwen adapters)."""
    config = tower.config
    require_bias_attention(config, "the vision tower")
    merge = config.spatial_merge_size
    state = QwenDToMeState(num_layers=len(tower.blocks), protect_first=False,
                           encoder=tower_identity(family, config), token_order="batch")

    def forward(pixels: Tensor):  # threshold finding / dymu.encode: still images [B, 3, H, W]
        flat, grid = patchify(pixels, config.patch_size, merge, config.temporal_patch_size)
        state.input_tokens = int(grid[0, 1] * grid[0, 2]) // merge**2
        return tower(flat, grid)

    state.forward = forward
    swap_class(tower, tower_factory, state)
    for index, blk in enumerate(tower.blocks):
        swap_class(blk, make_block, state, index=index)
        state.capture_keys(blk.attn.qkv, keys_of_qkv(num_heads))
    return state


def patch_first_tower(model: nn.Module, tower_class: type, family: str, tower_factory) -> QwenDToMeState | None:
    """Patch the first ``tower_class`` inside ``model`` (shared by the three Qwen adapters); None if there is none."""
    tower = first_instance(model, tower_class)
    return None if tower is None else patch_tower(tower, family, tower_factory, tower.config.num_heads)


def patch_model(model: nn.Module) -> QwenDToMeState | None:
    """Patch the first Qwen2-VL vision tower inside ``model``; None if there is none."""
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return patch_first_tower(model, Qwen2VisionTransformerPretrainedModel, "qwen2_vl", make_tower)
