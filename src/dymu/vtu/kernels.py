"""The two VTU attention computations (pure torch; no transformers import).

Both take q/k/v as transformers' attention functions receive them (q and k already rotated by the model at
each merged slot's representative position, the KV cache already updated) and the call's
:class:`~dymu.vtu.layout.Layout`, and return ``[B, Sq, H, D]`` as transformers' attention functions do:

* :func:`vtu_attention_fast`: gather q/k/v to virtual length, re-rotate each copy to its virtual position,
  SDPA over the virtual sequence, average each group's rows back to its merged token;
* :func:`vtu_attention_exact`: the same numbers by the RoPE decomposition on merged length, Q, K and V never
  expanded (slower; the verification twin).

Common arguments:
    query: ``[B, H, Sq, D]`` rotated by the model at the slots' representative positions.
    key, value: ``[B, H_kv, S_kv, D]`` (the cache, GQA not repeated).
    lay: the call's layout (:meth:`VTUBatch.layout <dymu.vtu.layout.VTUBatch.layout>`).
    inv_freq: ``[D/2]`` pure RoPE inverse frequencies (``rotate_half`` RoPE over the whole head).
    scaling: the softmax scale; dropout: attention dropout probability.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.vtu.layout import Layout, rope_angles

__all__ = ["vtu_attention_fast", "vtu_attention_exact", "KERNELS", "EXACT_CHUNK_ELEMENTS"]

#: Signature shared by both kernels: ``(query, key, value, lay, inv_freq, scaling, dropout) -> [B, Sq, H, D]``.
VTUKernel = Callable[[Tensor, Tensor, Tensor, Layout, Tensor, float, float], Tensor]


def _gather_cols(x: Tensor, index: Tensor) -> Tensor:
    """Copy columns ``index [B, V]`` of ``x [B, H, S, D]``: ``[B, H, V, D]``, in ``x``'s memory layout.

    Uses ``index_select`` of whole rows, several times faster than an element-wise ``gather``: rows of
    ``H*D`` values when ``x`` is laid out ``[B, S, H, D]`` (q/k straight from transformers' projections),
    rows of ``D`` per head otherwise (the KV cache).
    """
    B, H, S, D = x.shape
    V = index.shape[1]
    if x.transpose(1, 2).is_contiguous():
        rows = x.transpose(1, 2).reshape(B, S, H * D)
        out = x.new_empty(B, V, H, D)
        for b in range(B):  # one index per sequence; B is small
            torch.index_select(rows[b], 0, index[b], out=out[b].view(V, H * D))
        return out.transpose(1, 2)
    x = x.contiguous()
    out = x.new_empty(B, H, V, D)
    for b in range(B):
        torch.index_select(x[b], 1, index[b], out=out[b])
    return out


def _rotate_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, V, D]`` in place further by ``cos/sin [B, 1, V, D/2]`` (``rotate_half`` RoPE).

    Rotations compose, so a vector the model rotated at position P becomes rotated at P + shift.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x1_old = x1.clone()
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).addcmul_(x1_old, sin)
    return x


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


def vtu_attention_fast(query: Tensor, key: Tensor, value: Tensor, lay: Layout, inv_freq: Tensor, scaling: float,
                       dropout: float = 0.0) -> Tensor:
    """Fast VTU attention: gather q/k/v to virtual length, re-rotate, causal SDPA, group mean (arguments: module
    docstring)."""
    H_kv = key.shape[1]
    n = lay.prompt_index.shape[1]
    cos, sin = lay.prompt_rotation(inv_freq, key.dtype)  # [B, 1, N_max, D/2]
    # keys/values: the merged prompt copied to its N_max virtual columns and turned to their positions,
    # then (decode) the generated tokens as cached, already at their own positions
    k = _gather_cols(key, lay.k_index)
    _rotate_(k[:, :, :n], cos, sin)
    v = _gather_cols(value, lay.k_index)
    # queries: the prompt's virtual rows in prefill; in decode the new tokens as they are
    q = query
    if not lay.identity_q:
        q = _rotate_(_gather_cols(query, lay.q_index), cos.to(query.dtype), sin.to(query.dtype))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=lay.sdpa_mask, is_causal=lay.sdpa_causal, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != H_kv,
    )
    return _group_mean(out, lay, query.shape[2])


#: Elements (floats) of the largest temporaries of the exact path, which works in blocks of kv heads x
#: query slots to bound its memory (~4 such temporaries are alive at once).
EXACT_CHUNK_ELEMENTS = 1 << 24


def _rows_by_column(lay: Layout, s_q: int) -> tuple[Tensor, Tensor]:
    """Virtual query rows of each query column: ``rows [B, Sq, r_max]`` (-1 pad) and counts ``[B, Sq]``."""
    B, vq = lay.q_index.shape
    col = torch.where(lay.q_valid, lay.q_index, s_q)
    sorted_col, order = torch.sort(col, dim=1, stable=True)
    counts = torch.zeros(B, s_q + 1, dtype=torch.long, device=col.device).scatter_add_(1, col, torch.ones_like(col))
    starts = torch.cumsum(counts, 1) - counts
    rank = torch.arange(vq, device=col.device) - starts.gather(1, sorted_col)
    r_max = max(1, int(counts[:, :s_q].max()))
    rows = torch.full((B, s_q + 1, r_max), -1, dtype=torch.long, device=col.device)
    keep = sorted_col < s_q
    b_idx = torch.arange(B, device=col.device)[:, None].expand_as(sorted_col)
    rows[b_idx[keep], sorted_col[keep], rank[keep]] = order[keep]
    return rows[:, :s_q], counts[:, :s_q]


def vtu_attention_exact(query: Tensor, key: Tensor, value: Tensor, lay: Layout, inv_freq: Tensor, scaling: float,
                        dropout: float = 0.0) -> Tensor:
    """Exact VTU attention by the RoPE decomposition on merged length (same contract as the fast one).

    With ``rotate_half`` RoPE, for merged query i and key j (as rotated by the model) and frequency f:
    ``dot = q1·k1 + q2·k2``, ``cross = q2·k1 − q1·k2``. For virtual rows a ∈ i, b ∈ j with extra
    rotations α_a, β_b (virtual minus representative position, times θ_f):

    ``score(a, b) = Σ_f dot·cos(α−β) − cross·sin(α−β)
                  = Σ_f cos α·(dot cos β + cross sin β) + sin α·(dot sin β − cross cos β)``.

    Q and K are never expanded: dot/cross are formed per merged pair (as ``q·conj(k) = dot + i·cross``
    with ``q = q1 + i·q2``), turned by the key side's ``e^{-iβ}`` per virtual key, then combined with the
    query side's cos/sin α by one small matmul per query slot (its virtual rows share dot/cross). Values
    are not expanded either: each key group's softmax weights are summed and multiplied with the merged V;
    each query slot's rows are averaged. Works in chunks of query slots (largest groups first) to bound
    memory; computed in float32.
    """
    B, H, s_q, D = query.shape
    H_kv, s_kv = key.shape[1], key.shape[2]
    G, Fq = H // H_kv, D // 2
    vk = lay.k_index.shape[1]
    # (q1, q2) and (k1, k2) as complex numbers per frequency: q·conj(k) = dot + i·cross
    qf, kf = query.float(), key.float()
    q_c = torch.complex(qf[..., :Fq], qf[..., Fq:]).view(B, H_kv, G, s_q, Fq)
    k_conj = torch.complex(kf[..., :Fq], -kf[..., Fq:])[:, :, None, None]  # [B, H_kv, 1, 1, S_kv, F]
    v = value.float()[:, :, None, None]  # [B, H_kv, 1, 1, S_kv, D]
    b_cos, b_sin = rope_angles(lay.k_shift, inv_freq)
    key_turn = torch.complex(b_cos, -b_sin)[:, None, None, None]  # e^{-iβ}, [B, 1, 1, 1, Vk, F]
    a_cos, a_sin = rope_angles(lay.q_shift, inv_freq)
    a_cs = torch.stack((a_cos, -a_sin), -1).flatten(-2)  # [B, Vq, 2F]: (cos α, −sin α) interleaved
    k_sel = lay.k_index[:, None, None, None, :, None]

    rows_of, counts = _rows_by_column(lay, s_q)
    counts_sorted, slot_order = torch.sort(counts, dim=1, descending=True, stable=True)
    blocked = ~lay.mask
    out = qf.new_zeros(B, H_kv, G, s_q, D)
    # Blocks of kv heads x query slots keep each temporary under EXACT_CHUNK_ELEMENTS (long sequences).
    unit = B * G * vk * 2 * Fq  # floats of the complex key-side tensor per (kv head, query slot)
    hb = max(1, min(H_kv, EXACT_CHUNK_ELEMENTS // unit))
    for h0 in range(0, H_kv, hb):
        h1 = min(H_kv, h0 + hb)
        n_h = h1 - h0
        q_h, k_h, v_h = q_c[:, h0:h1], k_conj[:, h0:h1], v[:, h0:h1]
        c0 = 0
        while c0 < s_q:
            r = int(counts_sorted[:, c0].max())
            if r == 0:  # only padding columns left (output 0)
                break
            per_slot = B * n_h * G * vk * max(2 * Fq, r)
            c1 = min(s_q, c0 + max(1, EXACT_CHUNK_ELEMENTS // per_slot))
            c = c1 - c0
            cols = slot_order[:, c0:c1]  # [B, c] query columns of this chunk
            qc = q_h.gather(3, cols[:, None, None, :, None].expand(B, n_h, G, c, Fq))[..., None, :]
            pair = qc * k_h  # [B, n_h, G, c, S_kv, F]: dot + i·cross on merged pairs
            # to virtual keys, turned by -β: Re/Im = dot·cos β + cross·sin β / cross·cos β − dot·sin β
            w = pair.gather(4, k_sel.expand(B, n_h, G, c, vk, Fq)).mul_(key_turn)
            z = torch.view_as_real(w).flatten(-2)  # [B, n_h, G, c, Vk, 2F]
            rows = rows_of.gather(1, cols[..., None].expand(B, c, rows_of.shape[2]))[..., :r]  # [B, c, r]
            flat = rows.clamp(min=0).reshape(B, c * r, 1)
            a = a_cs.gather(1, flat.expand(B, c * r, 2 * Fq)).view(B, 1, 1, c, r, 2 * Fq) * scaling
            scores = a @ z.transpose(-1, -2)  # Σ_f Re(w·e^{iα}) · scaling, [B, n_h, G, c, r, Vk]
            scores.masked_fill_(blocked.gather(1, flat.expand(B, c * r, vk)).view(B, 1, 1, c, r, vk), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if dropout:
                probs = F.dropout(probs, p=dropout)
            grouped = probs.new_zeros(B, n_h, G, c, r, s_kv).scatter_add_(
                -1, lay.k_index[:, None, None, None, None, :].expand(B, n_h, G, c, r, vk), probs
            )  # weights summed per key group
            rows_out = grouped @ v_h  # [B, n_h, G, c, r, D] with the merged values
            mean = (rows_out * (rows >= 0)[:, None, None, :, :, None]).sum(4)
            mean = mean / counts.gather(1, cols).clamp(min=1)[:, None, None, :, None]
            out[:, h0:h1].scatter_(3, cols[:, None, None, :, None].expand(B, n_h, G, c, D), mean)
            c0 = c1
    return out.view(B, H, s_q, D).transpose(1, 2).contiguous().to(query.dtype)


#: The kernel of each VTU mode.
KERNELS: dict[str, VTUKernel] = {"fast": vtu_attention_fast, "exact": vtu_attention_exact}
