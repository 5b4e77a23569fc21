"""Exact VTU attention by the RoPE decomposition on merged length (pure torch): Q, K and V are never expanded.

With ``rotate_half`` RoPE, for a merged query/key pair and frequency f, ``q·conj(k) = dot + i·cross`` is formed on
merged length and each virtual pair's score is ``Σ_f dot·cos(θ_f Δ) − cross·sin(θ_f Δ)``; each key group's softmax
weights are summed and multiplied with the merged V (:func:`vtu_attention_exact`). The same numbers as the fast path
up to float rounding; the verification twin in prefill, and the cheaper kernel for decode steps (one query row per
sequence, nothing re-expanded). Arguments and result: :mod:`dymu.vtu.ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.vtu.layout import Layout
from dymu.vtu.ops import reusable, rope_angles

__all__ = ["vtu_attention_exact", "EXACT_CHUNK_ELEMENTS"]

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
    reuse = reusable(query, key, value)  # else: fresh block buffers and no out= (autograd records)
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
