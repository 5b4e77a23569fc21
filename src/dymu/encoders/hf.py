"""DToMe for transformers' CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``,
or any model that contains one, e.g. ``CLIPModel`` or a LLaVA).

Both families share one block layout (``layer_norm1 → self_attn → + → layer_norm2 → mlp → +``),
so one block subclass serves both. CLIP protects its CLS token; SigLIP has none, and its
attention-pooling head is made size-aware too.
"""

from __future__ import annotations

from torch import Tensor, nn

from dymu.encoders.base import DToMeState, swap_class
from dymu.encoders.names import encoder_identity


def make_block(parent: type) -> type:
    class DToMeEncoderLayer(parent):
        def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
            state: DToMeState = self._dymu
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

    DToMeEncoderLayer.__name__ = DToMeEncoderLayer.__qualname__ = f"DToMe{parent.__name__}"
    return DToMeEncoderLayer


def make_encoder(parent: type) -> type:
    class DToMeEncoder(parent):
        def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, **kwargs):
            self._dymu.begin(inputs_embeds)
            return super().forward(inputs_embeds, attention_mask, **kwargs)

    DToMeEncoder.__name__ = DToMeEncoder.__qualname__ = f"DToMe{parent.__name__}"
    return DToMeEncoder


def make_pooling_head(parent: type) -> type:
    class DToMePoolingHead(parent):
        # SigLIP's probe attention: weight each key by its size and ignore padding
        def forward(self, hidden_state: Tensor) -> Tensor:
            bias = self._dymu.attention_bias(hidden_state.dtype)
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

    DToMePoolingHead.__name__ = DToMePoolingHead.__qualname__ = f"DToMe{parent.__name__}"
    return DToMePoolingHead


def find_tower(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The first CLIP/SigLIP vision model inside ``model`` (itself included) and its family."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    for module in model.modules():
        if isinstance(module, CLIPVisionModel):
            return module, "clip"
        if isinstance(module, SiglipVisionModel):
            return module, "siglip"
    return None


def patch_model(model: nn.Module) -> DToMeState | None:
    """Patch the first CLIP/SigLIP vision transformer inside ``model``; None if there is none."""
    found = find_tower(model)
    if found is None:
        return None
    tower, kind = found
    config = tower.config
    if config._attn_implementation not in ("sdpa", "eager", None):
        raise ValueError(
            f"DToMe needs an attention implementation that takes an additive bias ('sdpa' or 'eager'); "
            f"the vision tower uses {config._attn_implementation!r}"
        )
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


def hidden_states(model: nn.Module, pixel_values: Tensor) -> tuple[Tensor, ...]:
    """All hidden states of the tower in ``model`` (first block's input, then each block's output), padded."""
    found = find_tower(model)
    if found is None:
        raise ValueError(f"no CLIP/SigLIP vision model inside {type(model).__name__}")
    return found[0](pixel_values=pixel_values, output_hidden_states=True).hidden_states
