"""DToMe for transformers' Qwen2.5-VL vision tower (``Qwen2_5_VisionTransformerPretrainedModel``, or a model
that contains one, e.g. ``Qwen2_5_VLForConditionalGeneration``).

Segments are the attention windows: units merge only inside their window, so window attention stays
window-local; the full-attention blocks (``fullatt_block_indexes``) attend over the frame's merged units of all
its windows. Design and output: :mod:`dymu.encoders.qwen_vl`, :mod:`dymu.encoders.qwen2_vl`.
"""

from __future__ import annotations

from torch import Tensor, nn

from dymu.encoders.qwen2_vl import patch_first_tower
from dymu.encoders.qwen_vl import (
    QwenDToMeState,
    UnitPass,
    checked_call,
    frames_of,
    image_cells,
    pooled_output,
    running,
)


def make_tower(parent: type) -> type:
    class DToMeQwen2_5VisionTower(parent):
        """Follows ``Qwen2_5_VisionTransformerPretrainedModel.forward``. Changes: the window permutation is applied
        to the positions before the unit pass (not to cos/sin after); the blocks get the pass's window bounds or
        ``cu_seqlens`` and cos/sin (they follow the merges); ``pooler_output`` is each image's merged units after
        the merger in raster order of their first cell (the stock ``argsort(window_index)`` order when nothing
        merged)."""

        def forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs):
            # why: transformers' model modules take seconds to import; loaded once a tower is patched
            from transformers.vision_utils import get_vision_window_index

            position_ids, frame_bounds = checked_call(self, grid_thw, kwargs)
            unit = self.spatial_merge_unit
            window_index, windows = get_vision_window_index(
                grid_thw, spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
                patch_size=self.patch_size,
            )
            position_ids = position_ids.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
            hidden_states = self.patch_embed(hidden_states)
            hidden_states = self.permute_input_for_window_attn(hidden_states, window_index, hidden_states.shape[0])
            frames = frames_of(windows, frame_bounds)
            state = self._dymu_dtome_state
            units = UnitPass(state, hidden_states, position_ids, windows.diff().long(), frames,
                             window_index.to(frames.device), image_cells(grid_thw, self.spatial_merge_size),
                             lambda pos: self.rotary_pos_emb(hidden_states, pos), unit)
            with running(state, units):
                for layer, blk in enumerate(self.blocks):
                    full = layer in self.fullatt_block_indexes
                    hidden_states = blk(
                        hidden_states,
                        cu_seqlens=units.cu_seqlens if full else units.cu_window_seqlens,
                        max_seqlen=units.max_seqlen if full else None,
                        position_embeddings=units.position_embeddings,
                    )
                images = units.split_images(self.merger(hidden_states), [])
            return pooled_output(state, hidden_states, images)

    return DToMeQwen2_5VisionTower


def patch_model(model: nn.Module) -> QwenDToMeState | None:
    """Patch the first Qwen2.5-VL vision tower inside ``model``; None if there is none."""
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return patch_first_tower(model, Qwen2_5_VisionTransformerPretrainedModel, "qwen2_5_vl", make_tower)
