"""DToMe for timm's ``VisionTransformer`` — in particular open_clip's SigLIP towers (``ViT-SO400M-14-SigLIP-384``
is an open_clip ``TimmModel`` whose ``trunk`` is a timm ViT).

timm blocks (``Block``: ``norm1 → attn → ls1 → + → norm2 → mlp → ls2 → +``) take an additive ``attn_mask``, so the
size bias goes straight into timm's own attention; the keys are read from the fused ``qkv`` projection (after
``k_norm`` when the model has qk-norm). A class token, when present, is protected; register tokens are not
supported. The ``map`` (attention-pool) head and ``avg`` pooling are made size-aware. Needs timm >= 1.0
(blocks that accept ``attn_mask``).
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from dymu.encoders.base import DToMeState, first_instance, size_weighted_mean, swap_class
from dymu.encoders.names import encoder_identity


def make_block(parent: type) -> type:
    class DToMeBlock(parent):
        """Follows timm's ``Block.forward``. Changes: timm's attention gets the size bias as ``attn_mask``; after
        attention + residual the tokens are merged (metric: keys captured from the fused ``qkv``); padding rows are
        zeroed; the first block starts the bookkeeping."""

        def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if attn_mask is not None or is_causal:
                raise ValueError("DToMe blocks do not take an attention mask or causal attention")
            state: DToMeState = self._dymu_dtome_state
            if self._dymu_index == 0:
                state.begin(x)
            attn_out = self.attn(self.norm1(x), attn_mask=state.attention_bias(x.dtype))
            x = state.merge(self._dymu_index, x + self.drop_path1(self.ls1(attn_out)), state.take_keys())
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            return state.end_layer(x)

    return DToMeBlock


def make_trunk(parent: type) -> type:
    class DToMeTimmViT(parent):
        """timm's ``VisionTransformer``; change: ``pool`` ('map' attention pooling and 'avg') weights each merged
        token by its size and skips padding ('token' is unaffected)."""

        def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
            state: DToMeState = self._dymu_dtome_state
            bias = state.attention_bias(x.dtype) if state.tokens is not None else None
            if bias is None or state.tokens.sizes.shape[1] != x.shape[1]:
                return super().pool(x, pool_type)
            start = 0 if self.pool_include_prefix else self.num_prefix_tokens
            if self.attn_pool is not None:
                return self.attn_pool(x[:, start:], attn_mask=bias[..., start:])
            pool_type = self.global_pool if pool_type is None else pool_type
            if pool_type in ("token", ""):
                return super().pool(x, pool_type)
            if pool_type == "avg":
                return size_weighted_mean(x[:, start:], state.tokens.sizes[:, start:])
            raise ValueError(f"timm pooling {pool_type!r} is not supported on merged tokens (use 'avg', 'token', 'map')")

    return DToMeTimmViT


def find_tower(model: nn.Module) -> nn.Module | None:
    """The first timm ``VisionTransformer`` inside ``model`` (itself included), or None."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    return first_instance(model, VisionTransformer)


def patch_model(model: nn.Module) -> DToMeState | None:
    """Patch the first timm ViT inside ``model`` (e.g. open_clip SigLIP's ``visual.trunk``); None if there is none."""
    trunk = find_tower(model)
    if trunk is None:
        if _wraps_timm(model) and not _timm_available():
            raise ValueError(
                "this open_clip model wraps a timm vision tower but timm's VisionTransformer is not importable: "
                "pip install 'timm>=1.0'"
            )
        return None
    # why: optional dependency (pip install 'dymu[openclip]')
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    blocks = list(trunk.blocks)
    for i, block in enumerate(blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ValueError(
                f"timm block {i} is {type(block).__name__} with {type(block.attn).__name__}; DToMe supports "
                "timm's standard Block with Attention"
            )
    if "attn_mask" not in inspect.signature(Block.forward).parameters:
        raise ValueError("this timm version's Block takes no attn_mask; DToMe needs timm >= 1.0")
    if trunk.num_prefix_tokens > 1:
        raise ValueError(f"timm ViT with {trunk.num_prefix_tokens} prefix tokens (registers) is not supported")
    if getattr(trunk, "attn_pool", None) is not None and getattr(trunk.attn_pool, "pos_embed", None) is not None:
        raise ValueError("timm attention pooling with a positional embedding is not supported on merged tokens")
    has_cls = trunk.num_prefix_tokens == 1
    pe = trunk.patch_embed
    state = DToMeState(
        num_layers=len(blocks),
        protect_first=has_cls,
        encoder=encoder_identity("clip" if has_cls else "siglip", pe.img_size, pe.patch_size, trunk.embed_dim),
        input_tokens=pe.num_patches + trunk.num_prefix_tokens,
        forward=_outermost(model, trunk),
    )
    swap_class(trunk, make_trunk, state)
    for index, block in enumerate(blocks):
        swap_class(block, make_block, state, index=index)
        state.capture_keys(block.attn.qkv, _keys_from_qkv(block.attn))
    return state


def _keys_from_qkv(attn: nn.Module):
    """The keys (after ``k_norm``), split by head, from the fused qkv projection's output."""

    def keys(qkv: Tensor) -> Tensor:
        B, N, _ = qkv.shape
        return attn.k_norm(qkv.view(B, N, 3, attn.num_heads, attn.head_dim)[:, :, 1])

    return keys


def _timm_available() -> bool:
    try:
        import timm.models.vision_transformer  # noqa: F401
    except ImportError:
        return False
    return True


def _wraps_timm(model: nn.Module) -> bool:
    return any(type(m).__name__ == "TimmModel" for m in model.modules())


def _outermost(model: nn.Module, trunk: nn.Module) -> nn.Module:
    # run open_clip's TimmModel (trunk + its projection head) when the trunk sits in one, else the trunk
    for m in model.modules():
        if type(m).__name__ == "TimmModel" and getattr(m, "trunk", None) is trunk:
            return m
    return trunk
