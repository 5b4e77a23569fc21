"""DToMe for open_clip's ``VisionTransformer`` (e.g. ``ViT-L-14-336``), alone or inside an open_clip ``CLIP``.

Its blocks are ``ResidualAttentionBlock``: ``ln_1 → nn.MultiheadAttention → ls_1 → + → ln_2 → mlp → ls_2 → +``.
``nn.MultiheadAttention`` takes no per-key bias and hides its keys, so the patched block computes attention
itself from the same weights: one ``F.linear`` with the fused ``in_proj_weight``, split into q/k/v, SDPA with
the size bias, ``out_proj``. The CLS token is protected. open_clip's ``transformer.batch_first`` may be False
(older releases run the stack sequence-first); the block then transposes in and out.

open_clip's SigLIP models (``ViT-SO400M-14-SigLIP-384``) wrap a timm ViT (``visual.trunk``); they are handled
by :mod:`dymu.encoders.timm_vit`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.encoders.base import DToMeState, first_instance, size_weighted_mean, swap_class
from dymu.encoders.names import encoder_identity


def make_block(parent: type) -> type:
    class DToMeResidualAttentionBlock(parent):
        """Follows ``ResidualAttentionBlock.forward`` (self-attention only). Changes: attention is computed from the
        fused ``in_proj_weight`` with SDPA so it can take the size bias and expose the keys (the stock call when
        merging is off); after attention + residual the tokens are merged; padding rows are zeroed; the first
        block starts the bookkeeping."""

        def forward(
            self,
            q_x: Tensor,
            k_x: Tensor | None = None,
            v_x: Tensor | None = None,
            attn_mask: Tensor | None = None,
        ) -> Tensor:
            if k_x is not None or v_x is not None:
                raise ValueError("DToMe blocks are self-attention only (open_clip cross-attention is not supported)")
            state: DToMeState = self._dymu_dtome_state
            batch_first = self.attn.batch_first
            x = q_x if batch_first else q_x.transpose(0, 1)  # always [B, N, C] below
            if self._dymu_index == 0:
                state.begin(x)
            bias = state.attention_bias(x.dtype)
            if state.mode == "off" and bias is None:
                # nothing to merge and no bias: the stock attention, so merging off is exactly stock
                h = self.ln_1(x) if batch_first else self.ln_1(x).transpose(0, 1)
                attn_out = self.attention(q_x=h, attn_mask=attn_mask)
                x = x + self.ls_1(attn_out if batch_first else attn_out.transpose(0, 1))
            else:
                attn_out, metric = self._dymu_attention(self.ln_1(x), bias, attn_mask)
                x = state.merge(self._dymu_index, x + self.ls_1(attn_out), metric)
            x = x + self.ls_2(self.mlp(self.ln_2(x)))
            x = state.end_layer(x)
            return x if batch_first else x.transpose(0, 1)

        def _dymu_attention(self, h: Tensor, bias: Tensor | None, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
            """nn.MultiheadAttention's self-attention, with an additive key bias; also returns the head-mean keys."""
            attn: nn.MultiheadAttention = self.attn
            B, N, C = h.shape
            H = attn.num_heads
            q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            metric = k.view(B, N, H, -1).mean(2)  # DToMe metric: keys averaged over heads
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:  # MHA semantics: True = not allowed
                    attn_mask = torch.zeros_like(attn_mask, dtype=h.dtype).masked_fill(attn_mask, float("-inf"))
                if attn_mask.shape[-1] != N:
                    raise ValueError(f"attn_mask covers {attn_mask.shape[-1]} tokens but the block holds {N}")
                bias = attn_mask.to(h.dtype) if bias is None else bias + attn_mask.to(h.dtype)
            q, k, v = (t.reshape(B, N, H, -1).transpose(1, 2) for t in (q, k, v))
            dropout = attn.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
            return attn.out_proj(out.transpose(1, 2).reshape(B, N, C)), metric

    return DToMeResidualAttentionBlock


def make_vision_transformer(parent: type) -> type:
    class DToMeVisionTransformer(parent):
        """open_clip's ``VisionTransformer``; change: ``_global_pool`` with ``pool_type="avg"`` weights each merged
        token by its size and skips padding ('tok', the CLS token, is unaffected)."""

        def _global_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
            state: DToMeState = self._dymu_dtome_state
            if self.pool_type != "avg" or state.tokens is None or state.tokens.sizes.shape[1] != x.shape[1]:
                return super()._global_pool(x)
            return size_weighted_mean(x[:, 1:], state.tokens.sizes[:, 1:]), x[:, 1:]

    return DToMeVisionTransformer


def find_tower(model: nn.Module) -> nn.Module | None:
    """The first open_clip ``VisionTransformer`` inside ``model`` (itself included), or None."""
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:
        return None
    return first_instance(model, VisionTransformer)


def patch_model(model: nn.Module) -> DToMeState | None:
    """Patch the first open_clip ``VisionTransformer`` inside ``model``; None if there is none."""
    tower = find_tower(model)
    if tower is None:
        return None
    # why: optional dependency (pip install 'dymu[openclip]')
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(tower.transformer.resblocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, ResidualAttentionBlock):
            raise ValueError(
                f"open_clip block {i} is a {type(block).__name__}; DToMe supports ResidualAttentionBlock "
                "(not the 'custom' block with qk-norm / scaled cosine attention)"
            )
        if not block.attn._qkv_same_embed_dim or block.attn.in_proj_weight is None:
            raise ValueError(f"open_clip block {i}: attention without a fused in_proj_weight is not supported")
    if tower.attn_pool is not None:
        raise ValueError("open_clip VisionTransformer with an attentional pooler (CoCa) is not supported by DToMe")
    grid = tuple(tower.grid_size)
    state = DToMeState(
        num_layers=len(blocks),
        protect_first=True,  # open_clip's ViT always has a class token
        encoder=encoder_identity("clip", tower.image_size, tower.patch_size, tower.transformer.width),
        input_tokens=grid[0] * grid[1] + 1,
        forward=tower,
    )
    swap_class(tower, make_vision_transformer, state)
    for index, block in enumerate(blocks):
        swap_class(block, make_block, state, index=index)
    return state

