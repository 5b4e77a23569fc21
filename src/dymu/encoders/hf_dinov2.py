"""DToMe for transformers' DINOv2 (``Dinov2Model``, or a model that contains one).

DINOv2 blocks are ``norm1 → attention → layer_scale1 → + → norm2 → mlp → layer_scale2 → +``; the merge goes
between the first residual add and ``norm2``, the metric is the key projection (``attention.k_proj``) averaged
over heads, and the CLS token is protected. Any input size works: the stock embeddings interpolate the position
embeddings (trained for 37×37 patches) to the input's patch grid before the first block, so the adapter sees
only a token sequence; :attr:`DToMeState.input_tokens` is updated on every forward (1 + patches of that input).

The final ``layernorm`` runs per token; its output at padded slots is zeroed so a batch's padding stays 0,
as in the other adapters. ``pooler_output`` is the CLS token, which never merges. DINOv2 with registers
(``Dinov2WithRegistersModel``) and the ``Dinov2Backbone`` feature-map interface are not supported; neither is
``Dinov2ForImageClassification`` (its head averages patch tokens without their sizes).
"""

from __future__ import annotations

from torch import Tensor, nn

from dymu.encoders.base import DToMeState, first_instance, require_bias_attention, swap_class
from dymu.encoders.names import encoder_identity


def make_layer(parent: type) -> type:
    class DToMeDinov2Layer(parent):
        """Follows ``Dinov2Layer.forward``. Changes: attention takes the size bias; after the first residual add
        the tokens are merged (metric: the keys captured from ``attention.k_proj``); padding rows are zeroed."""

        def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
            if attention_mask is not None:
                # a padding mask has the unmerged length: it cannot follow the tokens through merges
                raise ValueError("DToMe DINOv2 layers take no attention mask (pass none to the model)")
            state: DToMeState = self._dymu_dtome_state
            residual = hidden_states
            attn, _ = self.attention(
                self.norm1(hidden_states), attention_mask=state.attention_bias(hidden_states.dtype), **kwargs
            )
            hidden_states = self.drop_path(self.layer_scale1(attn)) + residual
            hidden_states = state.merge(self._dymu_index, hidden_states, state.take_keys())
            residual = hidden_states
            hidden_states = self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + residual
            return state.end_layer(hidden_states)

    return DToMeDinov2Layer


def make_encoder(parent: type) -> type:
    class DToMeDinov2Encoder(parent):
        """``Dinov2Encoder`` unchanged, but first starts the bookkeeping (with this input's token count)."""

        def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs):
            self._dymu_dtome_state.input_tokens = hidden_states.shape[1]  # depends on the input resolution
            self._dymu_dtome_state.begin(hidden_states)
            return super().forward(hidden_states, attention_mask, **kwargs)

    return DToMeDinov2Encoder


def make_final_norm(parent: type) -> type:
    class DToMeFinalNorm(parent):
        """The final ``LayerNorm``, with its output at padded slots re-zeroed."""

        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            tokens = self._dymu_dtome_state.tokens
            # LayerNorm(0) = bias: re-zero padded slots (only when there are any, so unmerged outputs are bitwise stock)
            if tokens is not None and tokens.sizes.shape[:2] == out.shape[:2] and not bool(tokens.mask.all()):
                out = out * tokens.mask[..., None].to(out.dtype)
            return out

    return DToMeFinalNorm


def find_tower(model: nn.Module) -> nn.Module | None:
    """The first ``Dinov2Model`` inside ``model`` (itself included), or None."""
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers import Dinov2Model

    return first_instance(model, Dinov2Model)


def patch_model(model: nn.Module) -> DToMeState | None:
    """Patch the first DINOv2 inside ``model``; None if there is none."""
    tower = find_tower(model)
    if tower is None:
        return None
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers import Dinov2ForImageClassification

    if isinstance(model, Dinov2ForImageClassification):
        raise ValueError(
            "Dinov2ForImageClassification averages patch tokens without their sizes; patch its .dinov2 "
            "(a Dinov2Model) and pool the merged tokens weighted by dymu.last_run(model).sizes instead"
        )
    config = tower.config
    require_bias_attention(config, "DINOv2")
    layers = list(tower.encoder.layer)
    state = DToMeState(
        num_layers=len(layers),
        protect_first=True,  # CLS
        encoder=encoder_identity("dinov2", config.image_size, config.patch_size, config.hidden_size),
        input_tokens=(config.image_size // config.patch_size) ** 2 + 1,  # nominal; the last forward's count later
        forward=tower,
    )
    swap_class(tower.encoder, make_encoder, state)
    _register_output_capture(tower.encoder)
    for index, layer in enumerate(layers):
        swap_class(layer, make_layer, state, index=index)
        state.capture_keys(layer.attention.k_proj, layer.attention.num_attention_heads)
    swap_class(tower.layernorm, make_final_norm, state)
    return state


def _register_output_capture(encoder: nn.Module) -> None:
    """Let ``output_hidden_states=True`` work on the swapped encoder class.

    transformers 5 looks up which outputs a model can record by ``str(model.__class__)`` (its private
    ``_CAN_RECORD_REGISTRY``, filled in ``post_init``); a swapped class is not in it, so hidden states would
    silently come back as None. Registering the subclass with the parent's spec is idempotent and harmless after
    :func:`dymu.unpatch`.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # other transformers versions: nothing to register
        return
    _CAN_RECORD_REGISTRY[encoder] = getattr(encoder, "_can_record_outputs", None)
