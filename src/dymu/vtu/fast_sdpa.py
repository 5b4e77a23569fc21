"""VTU attention by expansion and SDPA (pure torch): the fast path as written in the method.

Gather q, k, v of the merged tokens to virtual length, re-rotate each copy to its virtual position, causal SDPA
over the virtual sequence, average each group's output rows back to its merged token. Runs prefill and decode
(in decode the new tokens are their own query rows; the cached keys are re-expanded). Arguments and result:
:mod:`dymu.vtu.ops`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dymu.vtu.layout import Layout
from dymu.vtu.ops import gather_cols, reusable, rotate_, scratch

__all__ = ["vtu_attention_fast_sdpa", "virtual_qk"]


def virtual_qk(query: Tensor, key: Tensor, lay: Layout, inv_freq: Tensor, reuse: bool) -> tuple[Tensor, Tensor]:
    """q and k at virtual length, each copy turned to its virtual position: ``[B, H, Vq, D]``, ``[B, H_kv, Vk, D]``.

    Keys: the merged prompt copied to its ``N_max`` virtual columns and turned, then (decode) the generated tokens
    as cached, already at their own positions. Queries: the prompt's virtual rows in prefill; in decode the new
    tokens as they are (``query`` itself).
    """
    B, H_kv, _, D = key.shape
    n = lay.prompt_index.shape[1]
    vk, vq = lay.k_index.shape[1], lay.q_index.shape[1]
    cos, sin = lay.prompt_rotation(inv_freq, key.dtype)  # [B, 1, N_max, D/2]
    turn_size = (B * max(H_kv * vk, query.shape[1] * vq) * D // 2,)  # the rotation's temporary, k's or q's
    k = gather_cols(key, lay.k_index, scratch(lay.plans, "k", key, (B * H_kv * vk * D,), reuse))
    rotate_(k[:, :, :n], cos, sin, scratch(lay.plans, "rotation", key, turn_size, reuse))
    if lay.identity_q:
        return query, k
    q = gather_cols(query, lay.q_index, scratch(lay.plans, "q", query, (query[:, :, :1].numel() * vq,), reuse))
    tmp = scratch(lay.plans, "rotation", query, turn_size, reuse)  # k's buffer, unless q's dtype differs
    rotate_(q, cos.to(query.dtype), sin.to(query.dtype), tmp)
    return q, k


def _group_mean(out: Tensor, lay: Layout, s_q: int) -> Tensor:
    """Average SDPA's virtual rows ``[B, H, Vq, D]`` back to query columns: ``[B, Sq, H, D]`` (0 at padding)."""
    B, H, vq, D = out.shape
    rows = out.transpose(1, 2)  # SDPA lays its output out as [B, Vq, H, D]: a view
    if lay.identity_q:
        return rows.contiguous()
    rows = rows.reshape(B, vq, H * D)
    if not lay.sdpa_causal:  # padded rows exist: keep them out of slot sums
        rows = rows * lay.q_valid[..., None].to(rows.dtype)
    acc = rows.new_zeros(B, s_q, H * D)
    for b in range(B):
        acc[b].index_add_(0, lay.q_index[b], rows[b])
    acc.mul_(lay.q_count.clamp(min=1).reciprocal()[..., None].to(rows.dtype))
    return acc.view(B, s_q, H, D)


def vtu_attention_fast_sdpa(query: Tensor, key: Tensor, value: Tensor, lay: Layout, inv_freq: Tensor,
                            scaling: float, dropout: float = 0.0) -> Tensor:
    """Fast VTU attention: gather q/k/v to virtual length, re-rotate, causal SDPA, group mean."""
    B, H_kv, _, D = key.shape
    vk = lay.k_index.shape[1]
    reuse = reusable(query, key, value)
    q, k = virtual_qk(query, key, lay, inv_freq, reuse)
    v = gather_cols(value, lay.k_index, scratch(lay.plans, "v", value, (B * H_kv * vk * D,), reuse))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=lay.sdpa_mask, is_causal=lay.sdpa_causal, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != H_kv,
    )
    return _group_mean(out, lay, query.shape[2])
