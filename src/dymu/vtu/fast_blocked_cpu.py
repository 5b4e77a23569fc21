"""The fast path's prefill in blocks (pure torch): the numbers of :mod:`dymu.vtu.fast_sdpa`, cheaper on a CPU.

Torch's CPU SDPA kernel computes the whole score square at a few hundred tokens (its causal mode costs what the
non-causal one does) and multiplies V once per *virtual* row. Here q and k are expanded and turned as for SDPA,
then 64 virtual query rows at a time meet the keys up to the block's causal end only, and each block's softmax rows
are summed into their merged query slot and then their merged key slot — a slot's output is the mean of its rows'
outputs and the product with V is linear — so V is never expanded and is multiplied once per merged (query, key)
pair. Equal to the SDPA form up to float rounding. Arguments and result: :mod:`dymu.vtu.ops`.

Falls back to :func:`~dymu.vtu.fast_sdpa.vtu_attention_fast_sdpa` when nothing is merged (SDPA then computes
exactly what the stock model does; decode steps are such calls), when the blocks' masks would exceed
:data:`BLOCK_MASK_BYTES`, or with dropout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dymu.vtu.fast_sdpa import virtual_qk, vtu_attention_fast_sdpa
from dymu.vtu.layout import Layout
from dymu.vtu.ops import reusable, scratch, zeros

__all__ = ["vtu_attention_fast_blocked", "BLOCK_ROWS", "BLOCK_SCORE_ELEMENTS", "BLOCK_MASK_BYTES"]

#: Virtual query rows per block.
BLOCK_ROWS = 64
#: Scores of one block (heads x rows x keys, floats): ~1 MiB, so a block stays in the CPU cache.
BLOCK_SCORE_ELEMENTS = 1 << 18
#: Largest mask kept per call (bytes, additive biases of all blocks); longer calls use SDPA.
BLOCK_MASK_BYTES = 64 << 20

#: One row block: (first row, end row, key end, bias [rows, key end], slot [rows]).
Block = tuple[int, int, int, Tensor, Tensor]


def vtu_attention_fast_blocked(query: Tensor, key: Tensor, value: Tensor, lay: Layout, inv_freq: Tensor,
                               scaling: float, dropout: float = 0.0) -> Tensor:
    """Fast VTU attention with the score blocks cut at their causal end and V multiplied per merged pair."""
    blocks = None if dropout else _prefill_blocks(lay, query.dtype)
    if blocks is None:
        return vtu_attention_fast_sdpa(query, key, value, lay, inv_freq, scaling, dropout)
    reuse = reusable(query, key, value)
    q, k = virtual_qk(query, key, lay, inv_freq, reuse)
    return _blocked_prefill(q, k, value, lay, blocks, query.shape[2], scaling, reuse)


def _prefill_blocks(lay: Layout, dtype: torch.dtype) -> list[list[Block]] | None:
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
    blocks: list[list[Block]] | None = []
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


def _blocked_prefill(q: Tensor, k: Tensor, value: Tensor, lay: Layout, blocks: list[list[Block]], s_q: int,
                     scaling: float, reuse: bool) -> Tensor:
    """The attention and group mean in blocks of kv heads x virtual query rows.

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
    scores_buf = scratch(lay.plans, "scores", q, (hb * G * BLOCK_ROWS * vk,), reuse)
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
            acc = zeros(lay.plans, "rows", q, (nh, G, s_q + 1, vk), reuse)  # weights per query slot
            for a, e, k_end, bias, slot in blocks[b]:
                rows = nh * G * (e - a)
                scores = None if scores_buf is None else scores_buf[: rows * k_end].view(nh * G, e - a, k_end)
                probs = torch.baddbmm(bias, q_h[:, a:e], k_t[:, :, :k_end], alpha=scaling, out=scores).softmax(-1)
                acc[..., :k_end].index_add_(2, slot, probs.view(nh, G, e - a, k_end))
            pairs = zeros(lay.plans, "pairs", q, (nh, G, s_q + 1, s_kv), reuse).index_add_(3, lay.k_index[b], acc)
            res = torch.bmm(pairs.view(nh, G * (s_q + 1), s_kv), value[b, h0:h1]).view(nh, G, s_q + 1, D)
            out[b, :, h0 * G:h1 * G] = res[:, :, :s_q].flatten(0, 1).transpose(0, 1)
    return out.mul_(inv_count[:, :, None, None])
