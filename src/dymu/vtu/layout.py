"""The per-call attention layout of VTU (pure torch): which virtual row copies which q/k/v column, at which RoPE
shift, under which mask.

:func:`call_layout` (what :meth:`VTUBatch.layout <dymu.vtu.batch.VTUBatch.layout>` returns) builds the
:class:`Layout` of one attention call, prefill or decode step, from a :class:`~dymu.vtu.batch.VTUBatch`; every layer
of the call shares it. The kernels compute attention from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dymu.vtu.ops import rope_angles

if TYPE_CHECKING:  # batch.py imports this module to build its layouts
    from dymu.vtu.batch import VTUBatch

__all__ = ["Layout", "call_layout"]


@dataclass
class Layout:
    """The layout of one attention call under VTU, built by :meth:`VTUBatch.layout` (shared by all layers).

    ``Vq`` / ``Vk``: virtual query rows / key columns; ``Sq``: query columns the model computed (merged prompt
    slots in prefill, the new tokens in decode). In decode the keys are the merged prompt's virtual layout
    (``prompt_*``, ``[B, N_max]``) followed by the cached generated tokens (from column ``m_max`` on, shift 0).
    """

    q_index: Tensor  # [B, Vq] long: column of `query` each virtual query row copies (0 where invalid)
    q_shift: Tensor  # [B, Vq(, P)] float: virtual position − position the column was rotated at (per component)
    q_valid: Tensor  # [B, Vq] bool
    k_index: Tensor  # [B, Vk] long: column of `key`/`value` (the cache) each virtual key copies
    k_shift: Tensor  # [B, Vk(, P)] float
    mask: Tensor  # [B, Vq, Vk] bool, True = may attend; invalid query rows attend everything (discarded)
    q_count: Tensor  # [B, Sq] float: virtual rows per query column (0 at padding)
    identity_q: bool  # every query column is exactly one virtual row, in order (decode)
    expected_positions: Tensor  # [B, Sq] long: the position_ids the model must have rotated q at
    prompt_index: Tensor  # [B, N_max] long
    prompt_shift: Tensor  # [B, N_max(, P)] float
    m_max: int
    tables: dict  # the batch's cache of prompt cos/sin, shared by all layers and decode steps
    # what SDPA needs: (None, True) when `mask` is plain causal, (None, False) when it allows all
    sdpa_mask: Tensor | None = None
    sdpa_causal: bool = False
    # M-RoPE: the (t, h, w, ...) positions [B, Sq, P] the model must have rotated q at (None for 1-D RoPE)
    expected_rope: Tensor | None = None
    # what kernels derive from this layout once for all layers of the call (e.g. the exact path's slot plan)
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    def prompt_rotation(self, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin ``[B, 1, N_max, D/2]`` turning each prompt copy to its virtual position (cached).

        ``inv_freq``: ``[D/2]``, or the ``[P, D/2]`` frequency matrix of per-frequency positions (M-RoPE)."""
        key = (dtype, self.prompt_shift.device, inv_freq.data_ptr(), inv_freq._version)
        if key not in self.tables:
            self.tables.clear()
            cos, sin = rope_angles(self.prompt_shift, inv_freq)
            self.tables[key] = (cos[:, None].to(dtype), sin[:, None].to(dtype))
        return self.tables[key]


def call_layout(batch: VTUBatch, query: Tensor, key: Tensor) -> Layout:
    """The :class:`Layout` of an attention call on ``batch``, ``query [B, H, Sq, D]`` and ``key [B, H_kv, S_kv, D]``.

    ``Sq == S_kv`` is the prefill of the merged prompt (``M_max`` columns); ``Sq < S_kv`` a decode step on
    the cache (the merged prompt, then the generated tokens). Built once per call shape (every layer of a
    call shares it).

    Raises:
        ValueError: the call does not fit this batch (batch size, merged length, a cache that does not
            start with the full merged prompt, generation after right padding).
    """
    B, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if B != batch.batch_size:
        raise ValueError(f"VTU batch has {batch.batch_size} sequences but the model input has batch size {B}")
    m_max = batch.max_merged
    if q_len == kv_len and q_len != m_max:
        raise ValueError(
            f"VTU: the model input has merged length {q_len}, but the VTU batch expects M_max = {m_max} "
            "(pad the merged inputs with batch.pad(...) so their length matches the groups; to score appended "
            "tokens in one forward, make them part of the groups; generate needs use_cache=True)"
        )
    if q_len != kv_len:
        if kv_len - q_len < m_max:
            raise ValueError(
                f"VTU: a cached call must follow a full merged prefill of {m_max} slots; the cache holds "
                f"{kv_len - q_len}. Chunked prefill / prefix caches are not supported."
            )
        if batch.padding_side == "right" and min(batch._nm) < m_max:
            raise ValueError("VTU: generation needs padding_side='left' (right-padded rows would decode after padding)")
    cache_key = (q_len, kv_len, str(query.device))
    lay = batch._layouts.get(cache_key)
    if lay is None:
        lay = _build_layout(batch, q_len, kv_len, query.device)
        batch._layouts.clear()
        batch._layouts[cache_key] = lay
    return lay


def _build_layout(batch: VTUBatch, q_len: int, kv_len: int, device: torch.device) -> Layout:
    B, m_max = batch.batch_size, batch.max_merged
    gi = batch.group_index.to(device)
    p_valid = gi >= 0
    p_index = gi.clamp(min=0)
    p_vpos = batch.virtual_positions.to(device)
    reps = batch.position_ids.to(device)
    slot_rope = None if batch.slot_rope_positions is None else batch.slot_rope_positions.to(device)
    if slot_rope is None:
        p_shift = torch.where(p_valid, p_vpos - reps.gather(1, p_index), 0).float()
    else:  # M-RoPE: one shift per position component
        rep_rope = slot_rope.gather(1, p_index[..., None].expand(-1, -1, slot_rope.shape[2]))
        p_shift = torch.where(p_valid[..., None], batch.rope_positions.to(device) - rep_rope, 0).float()
    trail = p_shift.shape[2:]  # (P,) for M-RoPE, () for 1-D

    unpadded = min(batch._nv) == batch.max_virtual  # then virtual column = virtual position
    if q_len == kv_len:  # prefill: queries and keys are the merged prompt
        mask = (p_vpos[:, None, :] <= p_vpos[:, :, None]) & p_valid[:, None, :]
        mask |= ~p_valid[:, :, None]  # no fully-masked rows (NaN); those rows are discarded anyway
        return Layout(
            q_index=p_index, q_shift=p_shift, q_valid=p_valid, k_index=p_index, k_shift=p_shift, mask=mask,
            q_count=batch.group_sizes.to(device).float(), identity_q=False, expected_positions=reps,
            prompt_index=p_index, prompt_shift=p_shift, m_max=m_max, tables=batch._tables,
            sdpa_mask=None if unpadded else mask[:, None], sdpa_causal=unpadded, expected_rope=slot_rope,
        )

    # decode: the cache holds the merged prompt (M_max columns) then t generated tokens, each
    # generated token i rotated at its own virtual position N_b + i (shift 0); under M-RoPE at the last
    # slot's components + 1 + i, where the stock model continues after the prompt's last token.
    t = kv_len - m_max
    n_b = batch.num_virtual.to(device)[:, None]
    gen = torch.arange(t, device=device)
    k_index = torch.cat([p_index, (m_max + gen).expand(B, t)], 1)
    k_shift = torch.cat([p_shift, torch.zeros(B, t, *trail, device=device)], 1)
    k_valid = torch.cat([p_valid, torch.ones(B, t, dtype=torch.bool, device=device)], 1)
    k_vpos = torch.cat([p_vpos, n_b + gen], 1)
    q_vpos = n_b + (t - q_len) + torch.arange(q_len, device=device)
    mask = (k_vpos[:, None, :] <= q_vpos[:, :, None]) & k_valid[:, None, :]
    q_rope = None
    if slot_rope is not None:
        ends = torch.tensor([o + m - 1 for o, m in zip(batch.merged_offsets(), batch._nm)], device=device)
        last = slot_rope[torch.arange(B, device=device), ends]  # [B, P]
        q_rope = last[:, None, :] + 1 + (t - q_len) + torch.arange(q_len, device=device)[None, :, None]
    return Layout(
        q_index=torch.arange(q_len, device=device).expand(B, q_len),
        q_shift=torch.zeros(B, q_len, *trail, device=device),
        q_valid=torch.ones(B, q_len, dtype=torch.bool, device=device), k_index=k_index, k_shift=k_shift, mask=mask,
        q_count=torch.ones(B, q_len, device=device), identity_q=True, expected_positions=q_vpos,
        prompt_index=p_index, prompt_shift=p_shift, m_max=m_max, tables=batch._tables,
        sdpa_mask=None if (unpadded and q_len == 1) else mask[:, None], expected_rope=q_rope,
    )
