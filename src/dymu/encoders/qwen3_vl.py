"""DToMe for transformers' Qwen3-VL vision tower (``Qwen3VLVisionModel``, or a model that contains one, e.g.
``Qwen3VLForConditionalGeneration``).

As Qwen2-VL (units merge within each frame), plus DeepStack: the hidden states after each block in
``deepstack_visual_indexes`` are kept and, after the last block, averaged over the *final* groups (position-wise,
per original unit) before their DeepStack merger runs, so every DeepStack feature lines up with a final token.
``dymu.get_state(model).images[i].deepstack`` holds them per image; ``deepstack_features`` concatenates them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dymu.encoders.qwen2_vl import patch_first_tower
from dymu.encoders.qwen_vl import QwenDToMeState, UnitPass, checked_call, image_cells, running


def make_tower(parent: type) -> type:
    class DToMeQwen3VisionTower(parent):
        """Follows ``Qwen3VLVisionModel.forward``. Changes: the blocks get ``cu_seqlens`` and cos/sin from the unit
        pass (they follow the merges); DeepStack layers' hidden states are regrouped like the final tokens before
        their merger; outputs are per image in raster order of each token's first cell (stock order when nothing
        merged)."""

        def forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs):
            # why: transformers' model modules take seconds to import; loaded once a tower is patched
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            position_ids, frames = checked_call(self, grid_thw, kwargs)
            interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
                grid_thw, num_grid_per_side=self.num_grid_per_side, mode=self.interpolation_mode,
                align_corners=self.interpolation_align_corners, spatial_merge_size=self.config.spatial_merge_size,
            )
            hidden_states = self.patch_embed(hidden_states)
            pos_embeds = (self.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
            hidden_states = hidden_states + pos_embeds.to(hidden_states.dtype)
            cells = image_cells(grid_thw, self.spatial_merge_size)
            state = self._dymu_dtome_state
            units = UnitPass(state, hidden_states, position_ids, frames.diff().long(),
                             torch.arange(len(frames) - 1, device=frames.device),
                             torch.arange(sum(cells), device=frames.device), cells,
                             lambda pos: self.rotary_pos_emb(hidden_states, pos), self.spatial_merge_unit)
            with running(state, units):
                for layer, blk in enumerate(self.blocks):
                    hidden_states = blk(hidden_states, cu_seqlens=units.cu_seqlens, max_seqlen=units.max_seqlen,
                                        position_embeddings=units.position_embeddings)
                    if layer in self.deepstack_visual_indexes:
                        units.keep_for_final_groups(hidden_states)
                mergers = [self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer)]
                           for layer in range(len(self.blocks)) if layer in self.deepstack_visual_indexes]
                deepstack = [merger(x) for merger, x in zip(mergers, units.regrouped())]
                images = units.split_images(self.merger(hidden_states), deepstack)
            state.images = images
            return BaseModelOutputWithDeepstackFeatures(
                last_hidden_state=hidden_states,
                pooler_output=torch.cat([m.features for m in images]),
                deepstack_features=[torch.cat([m.deepstack[i] for m in images]) for i in range(len(deepstack))],
            )

    return DToMeQwen3VisionTower


def patch_model(model: nn.Module) -> QwenDToMeState | None:
    """Patch the first Qwen3-VL vision tower inside ``model``; None if there is none."""
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return patch_first_tower(model, Qwen3VLVisionModel, "qwen3_vl", make_tower)
