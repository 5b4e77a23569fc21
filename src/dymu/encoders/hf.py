"""DToMe for transformers' CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``,
or any model that contains one, e.g. ``CLIPModel`` or a LLaVA).

Both families share one block layout (``layer_norm1 → self_attn → + → layer_norm2 → mlp → +``),
so one block subclass serves both. CLIP protects its CLS token; SigLIP has none, and its
attention-pooling head is made size-aware too.
"""

from __future__ import annotations

from torch import Tensor, nn

from dymu.encoders.base import DToMeState, first_instance, require_bias_attention, swap_class
from dymu.encoders.names import encoder_identity


def make_block(parent: type) -> type:
    class DToMeEncoderLayer(parent):
        """Follows ``CLIPEncoderLayer.forward`` / ``SiglipEncoderLayer.forward``. Changes: the size bias (log size,
        padding masked) is added to the attention mask; after attention + residual the tokens are merged
        (metric: the keys captured from ``self_attn.k_proj``); the output's padding rows are zeroed."""

        def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
            state: DToMeState = self._dymu_dtome_state
            bias = state.attention_bias(hidden_states.dtype)
            if attention_mask is not None:
                bias = attention_mask if bias is None else attention_mask + bias
            residual = hidden_states
            hidden_states = self.layer_norm1(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=bias, **kwargs)
            hidden_states = state.merge(self._dymu_index, residual + hidden_states, state.take_keys())
            residual = hidden_states
            hidden_states = self.mlp(self.layer_norm2(hidden_states))
            return state.end_layer(residual + hidden_states)

    return DToMeEncoderLayer


def make_encoder(parent: type) -> type:
    class DToMeEncoder(parent):
        """``CLIPEncoder`` / ``SiglipEncoder`` unchanged, but first starts the pass's token bookkeeping."""

        def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, **kwargs):
            self._dymu_dtome_state.begin(inputs_embeds)
            return super().forward(inputs_embeds, attention_mask, **kwargs)

    return DToMeEncoder


def make_pooling_head(parent: type) -> type:
    class DToMePoolingHead(parent):
        """Follows ``SiglipMultiheadAttentionPoolingHead.forward``. Change: the probe's attention takes the size
        bias, so each key weighs by its size and padding is ignored (stock when nothing merged)."""

        def forward(self, hidden_state: Tensor) -> Tensor:
            bias = self._dymu_dtome_state.attention_bias(hidden_state.dtype)
            if bias is None:
                return super().forward(hidden_state)
            B = hidden_state.shape[0]
            heads = self.attention.num_heads
            attn_mask = bias[:, 0].expand(B, 1, -1).repeat_interleave(heads, dim=0)  # [B*H, 1, N]
            probe = self.probe.repeat(B, 1, 1)
            hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=attn_mask)[0]
            residual = hidden_state
            hidden_state = residual + self.mlp(self.layernorm(hidden_state))
            return hidden_state[:, 0]

    return DToMePoolingHead


def find_tower(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The first CLIP/SigLIP vision model inside ``model`` (itself included) and its family."""
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers import CLIPVisionModel, SiglipVisionModel

    tower = first_instance(model, (CLIPVisionModel, SiglipVisionModel))
    return None if tower is None else (tower, "clip" if isinstance(tower, CLIPVisionModel) else "siglip")


def patch_model(model: nn.Module) -> DToMeState | None:
    """Patch the first CLIP/SigLIP vision transformer inside ``model``; None if there is none."""
    found = find_tower(model)
    if found is None:
        return None
    tower, kind = found
    config = tower.config
    require_bias_attention(config, "the vision tower")
    layers = list(tower.encoder.layers)
    patches = (config.image_size // config.patch_size) ** 2
    state = DToMeState(
        num_layers=len(layers),
        protect_first=kind == "clip",
        encoder=encoder_identity(kind, config.image_size, config.patch_size, config.hidden_size),
        input_tokens=patches + (1 if kind == "clip" else 0),
        forward=tower,
    )
    swap_class(tower.encoder, make_encoder, state)
    for index, layer in enumerate(layers):
        swap_class(layer, make_block, state, index=index)
        state.capture_keys(layer.self_attn.k_proj, layer.self_attn.num_heads)
    head = getattr(tower, "head", None)
    if head is not None:
        swap_class(head, make_pooling_head, state)
    return state
