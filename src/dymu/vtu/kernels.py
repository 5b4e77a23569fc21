"""The two VTU attention computations (pure torch; no transformers import).

Both take q/k/v as transformers' attention functions receive them (q and k already rotated by the model at
each merged slot's representative position, the KV cache already updated) and the call's
:class:`~dymu.vtu.layout.Layout`, and return ``[B, Sq, H, D]`` as transformers' attention functions do:

* :func:`vtu_attention_fast`: gather q/k/v to virtual length, re-rotate each copy to its virtual position,
  SDPA over the virtual sequence, average each group's rows back to its merged token; a float32 prefill on
  CPU computes the same in blocks instead (:func:`_blocked_prefill`: keys cut at each block's causal end,
  softmax rows summed per merged query and key slot, one product with the merged V);
* :func:`vtu_attention_exact`: the same numbers by the RoPE decomposition on merged length, Q, K and V never
  expanded (slower; the verification twin).

Common arguments:
    query: ``[B, H, Sq, D]`` rotated by the model at the slots' representative positions.
    key, value: ``[B, H_kv, S_kv, D]`` (the cache, GQA not repeated).
    lay: the call's layout (:meth:`VTUBatch.layout <dymu.vtu.layout.VTUBatch.layout>`).
    inv_freq: ``[D/2]`` pure RoPE inverse frequencies (``rotate_half`` RoPE over the whole head), or for
        per-frequency positions (M-RoPE) the ``[P, D/2]`` frequency matrix of :mod:`dymu.vtu.mrope`, with the
        layout's shifts carrying a trailing component axis; the kernels are the same for both.
    scaling: the softmax scale; dropout: attention dropout probability.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.vtu.layout import Layout, rope_angles

__all__ = ["vtu_attention_fast", "vtu_attention_exact", "KERNELS", "EXACT_CHUNK_ELEMENTS", "FAST_BLOCKED_ON_CPU"]

#: Signature shared by both kernels: ``(query, key, value, lay, inv_freq, scaling, dropout) -> [B, Sq, H, D]``.
VTUKernel = Callable[[Tensor, Tensor, Tensor, Layout, Tensor, float, float], Tensor]


def _scratch(lay: Layout, name: str, like: Tensor, shape: tuple[int, ...], reuse: bool) -> Tensor | None:
    """An uninitialised ``shape`` buffer like ``like``, one per layout and name, which every layer of the call writes
    again (fresh large CPU allocations pay their page faults on every layer), so a VTU batch serves one forward at a
    time; None unless ``reuse`` (autograd records: the ops then allocate their outputs)."""
    if not reuse:
        return None
    key = ("scratch", name, shape, like.dtype, like.device, torch.is_inference_mode_enabled())
    buf = lay.plans.get(key)
    if buf is None:
        buf = lay.plans[key] = like.new_empty(shape)
    return buf


def _reusable(*tensors: Tensor) -> bool:
    """Buffers may be reused across layers: nothing here is recorded for autograd."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _zeros(lay: Layout, name: str, like: Tensor, shape: tuple[int, ...], reuse: bool) -> Tensor:
    """:func:`_scratch` filled with zeros, or new zeros."""
    buf = _scratch(lay, name, like, shape, reuse)
    return like.new_zeros(shape) if buf is None else buf.zero_()


def _gather_cols(x: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """Copy columns ``index [B, V]`` of ``x [B, H, S, D]``: ``[B, H, V, D]``, in ``x``'s memory layout.

    Uses ``index_select`` of whole rows, several times faster than an element-wise ``gather``: rows of
    ``H*D`` values when ``x`` is laid out ``[B, S, H, D]`` (q/k straight from transformers' projections),
    rows of ``D`` per head otherwise (the KV cache). ``out``: a buffer of ``B*H*V*D`` elements to write into
    (without one, a differentiable copy).
    """
    B, H, S, D = x.shape
    V = index.shape[1]
    if out is None:  # autograd records: index_select with out= is not differentiable
        if x.transpose(1, 2).is_contiguous():
            rows = x.transpose(1, 2).reshape(B, S, H * D)
            return torch.stack([rows[b].index_select(0, index[b]) for b in range(B)]).view(B, V, H, D).transpose(1, 2)
        return torch.stack([x[b].index_select(1, index[b]) for b in range(B)])
    if x.transpose(1, 2).is_contiguous():
        rows = x.transpose(1, 2).reshape(B, S, H * D)
        out = out.view(B, V, H, D)
        for b in range(B):  # one index per sequence; B is small
            torch.index_select(rows[b], 0, index[b], out=out[b].view(V, H * D))
        return out.transpose(1, 2)
    x = x.contiguous()
    out = out.view(B, H, V, D)
    for b in range(B):
        torch.index_select(x[b], 1, index[b], out=out[b])
    return out


def _rotate_(x: Tensor, cos: Tensor, sin: Tensor, tmp: Tensor | None = None) -> Tensor:
    """Rotate ``x [B, H, V, D]`` in place further by ``cos/sin [B, 1, V, D/2]`` (``rotate_half`` RoPE).

    Rotations compose, so a vector the model rotated at position P becomes rotated at P + shift.
    ``tmp``: a buffer of at least ``x.numel() // 2`` elements for the intermediate.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x1_sin = torch.mul(x1, sin, out=None if tmp is None else tmp[: x1.numel()].view(x1.shape))
    x1.mul_(cos).addcmul_(x2, sin, value=-1)
    x2.mul_(cos).add_(x1_sin)
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
    docstring). A float32 prefill on CPU takes :func:`_blocked_prefill` instead of SDPA (equal up to float rounding)."""
    B, H_kv, _, D = key.shape
    n = lay.prompt_index.shape[1]
    vk, vq = lay.k_index.shape[1], lay.q_index.shape[1]
    reuse = _reusable(query, key, value)
    cos, sin = lay.prompt_rotation(inv_freq, key.dtype)  # [B, 1, N_max, D/2]
    turn_size = (B * max(H_kv * vk, query.shape[1] * vq) * D // 2,)  # the rotation's temporary, k's or q's
    # keys/values: the merged prompt copied to its N_max virtual columns and turned to their positions,
    # then (decode) the generated tokens as cached, already at their own positions
    k = _gather_cols(key, lay.k_index, _scratch(lay, "k", key, (B * H_kv * vk * D,), reuse))
    _rotate_(k[:, :, :n], cos, sin, _scratch(lay, "rotation", key, turn_size, reuse))
    # queries: the prompt's virtual rows in prefill; in decode the new tokens as they are
    q = query
    if not lay.identity_q:
        q = _gather_cols(query, lay.q_index, _scratch(lay, "q", query, (query[:, :, :1].numel() * vq,), reuse))
        tmp = _scratch(lay, "rotation", query, turn_size, reuse)  # k's buffer, unless q's dtype differs
        _rotate_(q, cos.to(query.dtype), sin.to(query.dtype), tmp)
        blocks = _prefill_blocks(lay, query.dtype) if _use_blocked(query, dropout) else None
        if blocks is not None:
            return _blocked_prefill(q, k, value, lay, blocks, query.shape[2], scaling, reuse)
    v = _gather_cols(value, lay.k_index, _scratch(lay, "v", value, (B * H_kv * vk * D,), reuse))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=lay.sdpa_mask, is_causal=lay.sdpa_causal, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != H_kv,
    )
    return _group_mean(out, lay, query.shape[2])


#: The fast path's prefill on CPU (float32/64, no dropout) runs :func:`_blocked_prefill`, not SDPA: torch's CPU
#: SDPA kernel computes the whole square at a few hundred tokens (causal costs what non-causal does), and
#: its product with V runs on virtual rows. ``False``: SDPA everywhere (as on GPU, where flash kernels skip
#: the masked blocks themselves).
FAST_BLOCKED_ON_CPU = True
#: Virtual query rows per block of :func:`_blocked_prefill`.
BLOCK_ROWS = 64
#: Scores of one block (heads x rows x keys, floats): ~1 MiB, so a block stays in the CPU cache.
BLOCK_SCORE_ELEMENTS = 1 << 18
#: Largest mask the blocked path keeps per call (bytes, additive biases of all blocks); longer calls use SDPA.
BLOCK_MASK_BYTES = 64 << 20


def _use_blocked(query: Tensor, dropout: float) -> bool:
    return (FAST_BLOCKED_ON_CPU and query.device.type == "cpu" and not dropout
            and query.dtype in (torch.float32, torch.float64))


def _prefill_blocks(lay: Layout, dtype: torch.dtype) -> list[list[tuple[int, int, int, Tensor, Tensor]]] | None:
    """The row blocks of each sequence's prefill, shared by all layers (cached on ``lay``); None if too big, or if
    nothing is merged (SDPA then computes exactly what the stock model does).

    Each block is ``(first row, end row, key end, bias [rows, key end], slot [rows])``: keys past the last
    column any real row of the block may attend are cut off (the causal saving); the bias is 0 where the
    layout allows a key and -inf elsewhere; ``slot`` is each row's merged query column, ``Sq`` (one past the
    last) for padding rows, whose sums are discarded. Blocks of padding rows only are left out.
    """
    key = ("blocked", dtype)
    if key in lay.plans:
        return lay.plans[key]
    B, vq, vk = lay.mask.shape
    s_q = lay.q_count.shape[1]
    if float(lay.q_count.max()) <= 1:
        lay.plans[key] = None
        return None
    cols = torch.arange(vk, device=lay.mask.device)
    last = torch.where(lay.mask, cols, -1).amax(-1)  # [B, Vq] last column each row may attend
    last = torch.where(lay.q_valid, last, -1).tolist()  # padding rows need no keys of their own
    slot = torch.where(lay.q_valid, lay.q_index, s_q)
    blocks: list[list[tuple[int, int, int, Tensor, Tensor]]] | None = []
    size = 0
    for b in range(B):
        seq = []
        for a in range(0, vq, BLOCK_ROWS):
            e = min(vq, a + BLOCK_ROWS)
            k_end = max(last[b][a:e]) + 1
            if k_end == 0:
                continue
            bias = torch.zeros(e - a, k_end, dtype=dtype, device=lay.mask.device)
            bias.masked_fill_(~lay.mask[b, a:e, :k_end], float("-inf"))
            bias[~lay.q_valid[b, a:e]] = 0  # padding rows: anything finite
            seq.append((a, e, k_end, bias, slot[b, a:e]))
            size += bias.numel() * bias.element_size()
        blocks.append(seq)
    if size > BLOCK_MASK_BYTES:
        blocks = None
    lay.plans[key] = blocks
    return blocks


def _blocked_prefill(q: Tensor, k: Tensor, value: Tensor, lay: Layout, blocks: list, s_q: int, scaling: float,
                     reuse: bool) -> Tensor:
    """The fast path's attention and group mean in blocks of kv heads x virtual query rows.

    ``q [B, H, Vq, D]``, ``k [B, H_kv, Vk, D]`` at virtual positions, ``value [B, H_kv, S_kv, D]`` as cached (merged);
    returns ``[B, Sq, H, D]``. Per block: scores against the keys up to the block's key end, softmax, and the
    rows' weights summed into their merged query slots. A slot's output is the mean of its rows' outputs and the
    product with V is linear, so the summed weights are then summed per key slot too (virtual keys of one slot
    share its value) and multiplied with the merged V: V is never expanded, and is multiplied once per merged
    pair instead of once per virtual pair.
    """
    B, H, vq, D = q.shape
    H_kv, vk, s_kv = k.shape[1], k.shape[2], value.shape[2]
    G = H // H_kv
    hb = max(1, min(H_kv, BLOCK_SCORE_ELEMENTS // (G * BLOCK_ROWS * vk)))
    out = q.new_empty(B, s_q, H, D)
    scores_buf = _scratch(lay, "scores", q, (hb * G * BLOCK_ROWS * vk,), reuse)
    inv_count = lay.q_count.clamp(min=1).reciprocal().to(q.dtype)
    for b in range(B):
        for h0 in range(0, H_kv, hb):
            h1 = min(H_kv, h0 + hb)
            nh = h1 - h0
            q_h = q[b, h0 * G:h1 * G]  # [nh*G, Vq, D]: query heads h0*G.. share kv heads h0.. (GQA order)
            k_h = k[b, h0:h1]
            if G > 1:
                k_h = k_h.repeat_interleave(G, 0)
            k_t = k_h.transpose(1, 2)  # [nh*G, D, Vk]
            acc = _zeros(lay, "rows", q, (nh, G, s_q + 1, vk), reuse)  # weights per query slot
            for a, e, k_end, bias, slot in blocks[b]:
                rows = nh * G * (e - a)
                scores = None if scores_buf is None else scores_buf[: rows * k_end].view(nh * G, e - a, k_end)
                probs = torch.baddbmm(bias, q_h[:, a:e], k_t[:, :, :k_end], alpha=scaling, out=scores).softmax(-1)
                acc[..., :k_end].index_add_(2, slot, probs.view(nh, G, e - a, k_end))
            pairs = _zeros(lay, "pairs", q, (nh, G, s_q + 1, s_kv), reuse).index_add_(3, lay.k_index[b], acc)
            res = torch.bmm(pairs.view(nh, G * (s_q + 1), s_kv), value[b, h0:h1]).view(nh, G, s_q + 1, D)
            out[b, :, h0 * G:h1 * G] = res[:, :, :s_q].flatten(0, 1).transpose(0, 1)
    return out.mul_(inv_count[:, :, None, None])


#: Complex elements of the exact path's largest temporary, the turned query-key products of one block
#: (kv heads x query slots x padded virtual keys x D/2): small enough to stay in the CPU cache while the
#: score product reads it back.
EXACT_CHUNK_ELEMENTS = 1 << 19

#: Cost of one more size bucket (one more round of small ops), in padded elements (see :func:`_size_runs`).
_BUCKET_OVERHEAD = 1 << 15


def _size_runs(sizes: list[int], weight: int) -> list[tuple[int, int]]:
    """Cut slots sorted by size (descending) into runs, each padded to its first slot's size.

    Returns ``[(start, end)]`` minimising ``Σ weight·(end-start)·size[start] + _BUCKET_OVERHEAD`` (padding
    against op count); runs only start where the size changes, so the search is over distinct sizes.
    """
    starts = [i for i in range(len(sizes)) if i == 0 or sizes[i] != sizes[i - 1]] + [len(sizes)]
    best = [0.0] + [float("inf")] * (len(starts) - 1)  # best[t]: cost of slots before starts[t]
    cut = [0] * len(starts)
    for t in range(1, len(starts)):
        for u in range(t):
            cost = best[u] + weight * (starts[t] - starts[u]) * sizes[starts[u]] + _BUCKET_OVERHEAD
            if cost < best[t]:
                best[t], cut[t] = cost, u
    runs, t = [], len(starts) - 1
    while t > 0:
        runs.append((starts[cut[t]], starts[t]))
        t = cut[t]
    return runs[::-1]


def _slot_buckets(index: Tensor, valid: Tensor, weight: int) -> list[tuple[Tensor, Tensor]]:
    """Group the virtual columns of one sequence by the merged slot they copy, slots bucketed by size.

    Args:
        index: ``[V]`` merged slot of each virtual column; valid: ``[V]`` bool.
        weight: the cost of one padded member (for :func:`_size_runs`).

    Returns:
        ``[(slots [n], members [n, R])]``: each bucket's slots (largest first) and their virtual columns,
        in column order, padded with -1 to the bucket's largest size ``R``.
    """
    cols = torch.nonzero(valid).flatten()
    slot = index[cols]
    uniq, inverse, counts = torch.unique(slot, return_inverse=True, return_counts=True)
    order = torch.sort(counts, descending=True, stable=True).indices  # slots by size, then by slot index
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    slot_rank = rank[inverse]  # each column's slot's place in size order
    by_slot = torch.sort(slot_rank, stable=True).indices  # columns grouped by slot, in column order
    sizes = counts[order].tolist()
    starts = torch.cumsum(counts[order], 0) - counts[order]
    member = torch.arange(len(cols), device=cols.device) - starts[slot_rank[by_slot]]
    buckets = []
    for a, b in _size_runs(sizes, weight):
        members = torch.full((b - a, sizes[a]), -1, dtype=torch.long, device=cols.device)
        sel = (slot_rank[by_slot] >= a) & (slot_rank[by_slot] < b)
        members[slot_rank[by_slot][sel] - a, member[sel]] = cols[by_slot][sel]
        buckets.append((uniq[order[a:b]], members))
    return buckets


def _exact_plan(lay: Layout, b: int, s_q: int, inv_freq: Tensor) -> dict:
    """What the exact path needs for sequence ``b`` of this call, shared by all layers (cached on ``lay``).

    Keys (slots of the cache) and queries (slots of the prompt) are bucketed by group size; virtual keys are
    laid out bucket by bucket, slot by slot (``K'`` padded columns), so a slot's members are contiguous:
    its softmax weights sum by a reshape, not a scatter.
    """
    key = ("exact", b, inv_freq.data_ptr(), inv_freq._version)
    plan = lay.plans.get(key)
    if plan is not None:
        return plan
    n_q = int(lay.q_valid[b].sum()) if not lay.identity_q else s_q
    attended = lay.mask[b][lay.q_valid[b]].any(0)  # key columns some real query row may attend
    k_buckets = _slot_buckets(lay.k_index[b], attended, weight=max(1, n_q))
    k_cols = torch.cat([m.flatten() for _, m in k_buckets])  # [K'] virtual key column, -1 = padding
    b_cos, b_sin = rope_angles(lay.k_shift[b][k_cols.clamp(min=0)], inv_freq)
    keys = []  # (slots, R, column offset, turn e^{-iβ} [n, R, F] or None when every shift is 0)
    off = 0
    for slots, members in k_buckets:
        n, r = members.shape
        shift = lay.k_shift[b][members.clamp(min=0)]
        turn = None  # size-1 slots at their own position (text, unmerged patches): nothing to turn
        if r > 1 or bool((shift[members >= 0] != 0).any()):
            turn = torch.complex(b_cos[off:off + n * r], -b_sin[off:off + n * r]).view(n, r, -1)
        keys.append((slots, r, off, turn))
        off += n * r
    k_slots = torch.cat([s for s, *_ in keys])  # [S'] key slots in bucket order (their values, summed weights)
    allowed_k = lay.mask[b][:, k_cols.clamp(min=0)] & (k_cols >= 0)  # [Vq, K']
    queries = []  # (slots [n], a [n, r, 2F], blocked [n, r, K'], row weights [n, r]: 1/size, 0 at padding)
    for slots, rows in _slot_buckets(lay.q_index[b], lay.q_valid[b], weight=max(1, len(k_cols))):
        real = rows >= 0
        a_cos, a_sin = rope_angles(lay.q_shift[b][rows.clamp(min=0)], inv_freq)
        a = torch.stack((a_cos, -a_sin), -1).flatten(-2)  # (cos α, −sin α) interleaved, as view_as_real
        allowed = allowed_k[rows.clamp(min=0)] | (~real[..., None] & (k_cols >= 0))  # padding rows: any key
        weights = real.float() / real.sum(1, keepdim=True).clamp(min=1)
        queries.append((slots, a, ~allowed, weights))
    plan = {"keys": keys, "k_slots": k_slots, "width": len(k_cols), "queries": queries}
    lay.plans[key] = plan
    return plan


def vtu_attention_exact(query: Tensor, key: Tensor, value: Tensor, lay: Layout, inv_freq: Tensor, scaling: float,
                        dropout: float = 0.0) -> Tensor:
    """Exact VTU attention by the RoPE decomposition on merged length (same contract as the fast one).

    With ``rotate_half`` RoPE, for merged query i and key j (as rotated by the model) and frequency f, write
    ``q = q1 + i·q2`` and ``p_ij = q_i·conj(k_j) = dot + i·cross`` (a product of merged tokens). For virtual
    rows a ∈ i, b ∈ j with extra rotations α_a, β_b (virtual minus representative position, times θ_f):

    ``score(a, b) = Σ_f Re(e^{iα_a} · p_ij · e^{-iβ_b})
                  = Σ_f cos α·(dot cos β + cross sin β) − sin α·(cross cos β − dot sin β)``.

    Q, K and V are never expanded: ``p`` is formed on merged pairs, turned by ``e^{-iβ}`` per virtual key
    (keys laid out slot by slot, slots bucketed by size, so this is a broadcast, not a gather), and combined
    with each query slot's cos/sin α rows by one small matmul (its virtual rows share ``p``). Each key slot's
    softmax weights are summed (a reshape) and multiplied with the merged V; each query slot's rows are
    averaged. Works per sequence, in blocks of kv heads x query slots of about :data:`EXACT_CHUNK_ELEMENTS`,
    in float32.
    """
    B, H, s_q, D = query.shape
    H_kv = key.shape[1]
    G, Fq = H // H_kv, D // 2
    qf, kf = query.float(), key.float()
    q_c = torch.complex(qf[..., :Fq], qf[..., Fq:]).view(B, H_kv, G, s_q, Fq)
    k_conj = torch.complex(kf[..., :Fq], -kf[..., Fq:])  # [B, H_kv, S_kv, F]
    out = qf.new_zeros(B, H_kv, G, s_q, D)
    reuse = _reusable(query, key, value)  # else: fresh block buffers and no out= (autograd records)
    for b in range(B):
        plan = _exact_plan(lay, b, s_q, inv_freq)
        width, k_slots, keys = plan["width"], plan["k_slots"], plan["keys"]
        k_b = k_conj[b].index_select(1, k_slots)  # [H_kv, S', F]: merged keys in bucket order
        v_b = value[b].float().index_select(1, k_slots)  # [H_kv, S', D]
        per_slot = G * width * Fq  # complex elements of one (kv head, query slot)
        # blocks: query slots first (their keys' turn tables are shared), then kv heads
        n_max = max(len(q_slots) for q_slots, *_ in plan["queries"])
        cb = max(1, min(n_max, EXACT_CHUNK_ELEMENTS // per_slot))
        hb = max(1, min(H_kv, EXACT_CHUNK_ELEMENTS // (cb * per_slot)))
        # buffers reused by every block (fresh large allocations cost page faults on each block)
        w_buf = q_c.new_empty(hb * G * cb * width * Fq) if reuse else None
        p_buf = q_c.new_empty(hb * G * cb * max(len(sl) for sl, *_ in keys) * Fq) if reuse else None
        for q_slots, a_all, blocked_all, weights_all in plan["queries"]:
            n, r = weights_all.shape
            for h0 in range(0, H_kv, hb):
                h1 = min(H_kv, h0 + hb)
                nh = h1 - h0
                for c0 in range(0, n, cb):
                    c1 = min(n, c0 + cb)
                    c, cols = c1 - c0, q_slots[c0:c1]
                    qc = q_c[b, h0:h1].index_select(2, cols)[..., None, :]  # [h, G, c, 1, F]
                    w = (w_buf[: nh * G * c * width * Fq] if reuse else q_c.new_empty(nh * G * c * width * Fq)).view(
                        nh, G, c, width, Fq)
                    s0 = 0
                    for slots, rk, off, turn in keys:
                        m = len(slots)
                        k_j = k_b[h0:h1, None, None, s0:s0 + m]  # [h, 1, 1, m, F]
                        dst = w[..., off:off + m * rk, :]
                        if turn is None:
                            _mul_into(qc, k_j, dst, reuse)
                        else:
                            pair = qc * k_j if p_buf is None else torch.mul(
                                qc, k_j, out=p_buf[: nh * G * c * m * Fq].view(nh, G, c, m, Fq))
                            _mul_into(pair[..., None, :], turn, dst.view(nh, G, c, m, rk, Fq), reuse)
                        s0 += m
                    z = torch.view_as_real(w).view(nh, G, c, width, 2 * Fq)
                    scores = (a_all[c0:c1] * scaling) @ z.transpose(-1, -2)  # [h, G, c, r, K']
                    scores.masked_fill_(blocked_all[c0:c1], float("-inf"))
                    probs = torch.softmax(scores, dim=-1)
                    if dropout:
                        probs = F.dropout(probs, p=dropout)
                    # each key slot's weights summed: its members are contiguous columns
                    grouped = probs.new_empty(nh, G, c, r, len(k_slots))
                    s0 = 0
                    for slots, rk, off, _ in keys:
                        m = len(slots)
                        members = probs[..., off:off + m * rk].unflatten(-1, (m, rk))
                        if reuse:
                            torch.sum(members, -1, out=grouped[..., s0:s0 + m])
                        else:
                            grouped[..., s0:s0 + m] = members.sum(-1)
                        s0 += m
                    rows_out = grouped.view(nh, G * c * r, -1) @ v_b[h0:h1]  # [h, G*c*r, D]
                    mean = (rows_out.view(nh, G, c, r, D) * weights_all[c0:c1, :, None]).sum(3)  # [h, G, c, D]
                    out[b, h0:h1].index_copy_(2, cols, mean)
    return out.view(B, H, s_q, D).transpose(1, 2).contiguous().to(query.dtype)


def _mul_into(a: Tensor, b: Tensor, dst: Tensor, reuse: bool) -> Tensor:
    """``dst = a * b`` without a temporary, or (autograd records: ``out=`` is not differentiable) through one."""
    return torch.mul(a, b, out=dst) if reuse else dst.copy_(a * b)


#: The kernel of each VTU mode.
KERNELS: dict[str, VTUKernel] = {"fast": vtu_attention_fast, "exact": vtu_attention_exact}
