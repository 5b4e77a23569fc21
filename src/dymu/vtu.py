"""VTU — virtual token unmerging for RoPE decoders (Llama, Qwen2, Mistral in transformers 5).

After DToMe, an image is a handful of merged tokens instead of its full patch grid. VTU lets the
language model act as if it saw the full *virtual* sequence ``M·e`` (every merged token copied back
to each original position, each copy at its own RoPE position) while linear layers, norms and the
MLP run only once per merged token. Per decoder layer:

* ``fast``: project Q, K, V on merged tokens; gather them to virtual length; RoPE at the virtual
  positions; causal SDPA over the virtual sequence; average each group's outputs back to one token.
* ``exact``: the same numbers without expanding Q and K: per-frequency ``dot = q1·k1 + q2·k2`` and
  ``cross = q2·k1 − q1·k2`` on merged pairs, combined with the virtual positions' cos/sin
  (``score = Σ_f dot·cos(θ_f Δ) − cross·sin(θ_f Δ)``); values are never expanded: attention weights
  are summed per key group and multiplied with the merged V. Slower; the fast path's twin.

Text tokens are groups of one, so a sequence without merged tokens is computed exactly as stock.

Interface
---------
Groups of one sequence
    ``groups [N]`` (LongTensor, N = virtual length): ``groups[p]`` is the merged slot (``0..M-1``) that
    virtual position ``p`` belongs to. Every slot must be covered; a slot may cover non-contiguous
    positions. :func:`concat_groups` builds it from text runs and per-image group maps.
Batch layout
    :func:`prepare_vtu` turns a list of groups into a :class:`VTUBatch`: merged layout padded to
    ``M_max`` (left padding by default, as generation needs), with ``position_ids`` (one representative
    virtual position per slot; the last real slot has ``N_b - 1`` so ``generate`` continues at ``N_b``),
    ``attention_mask``, the padded group index and ``N_b``/``M_b``. :meth:`VTUBatch.pad` pads
    per-sequence merged ``inputs_embeds``/``input_ids`` to that layout.
Model
    :func:`enable_vtu(model, "fast" | "exact" | "off") <enable_vtu>` selects the registered attention
    function on the text decoder (a VLM's vision tower keeps its own); :func:`disable_vtu` restores the
    previous implementation. Per-call state travels in :func:`vtu_context` (a ``ContextVar``, since
    ``generate`` rejects unknown kwargs) or in a ``vtu_batch=`` forward kwarg. Outside both, the
    registered function *is* stock sdpa (same mask, same call), so an enabled model is unchanged.

::

    batch = prepare_vtu([groups_a, groups_b])
    embeds = batch.pad([merged_embeds_a, merged_embeds_b])      # [B, M_max, C]
    enable_vtu(model, "fast")
    with vtu_context(batch):
        out = model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, max_new_tokens=16)

(:func:`vtu_forward` / :func:`vtu_generate` do exactly that.) Always pass ``batch.position_ids`` and
``batch.attention_mask``: without explicit positions ``generate`` numbers the merged slots ``0..M-1``
and would continue at ``M``; the VTU function checks this and raises.

KV cache
    The cache is the stock one and holds *merged*-length keys/values (``M_b`` + generated tokens, not
    ``N_b`` + generated), each key rotated at its slot's representative position. Decode steps
    re-expand cached keys to virtual length (re-rotating them by the angle difference) inside the
    attention function. See ``docs/vtu.md`` for memory and time figures.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VTUMode",
    "VTUBatch",
    "prepare_vtu",
    "concat_groups",
    "pad_merged",
    "vtu_context",
    "current_vtu_batch",
    "enable_vtu",
    "disable_vtu",
    "vtu_mode",
    "vtu_forward",
    "vtu_generate",
    "vtu_attention_fast",
    "vtu_attention_exact",
    "ATTN_IMPLEMENTATIONS",
]

VTUMode = Literal["fast", "exact", "off"]

#: Names under which the VTU attention functions are registered with transformers.
ATTN_IMPLEMENTATIONS: dict[str, str] = {"fast": "dymu_vtu_fast", "exact": "dymu_vtu_exact"}

_CURRENT: contextvars.ContextVar["VTUBatch | None"] = contextvars.ContextVar("dymu_vtu_batch", default=None)


# --------------------------------------------------------------------------------------------------
# Groups and batch layout
# --------------------------------------------------------------------------------------------------


@dataclass
class VTUBatch:
    """Per-call VTU state for a batch of sequences (see the module docstring for the layout).

    Attributes:
        groups: the per-sequence group maps as given (``[N_b]`` each).
        position_ids: ``[B, M_max]`` long, the virtual position each merged slot is rotated at by the
            model (a member of its group, the median one; ``N_b - 1`` for the last real slot); 0 at
            padding.
        attention_mask: ``[B, M_max]`` long, 1 for real merged slots, 0 for padding.
        group_index: ``[B, N_max]`` long, for each column of the padded virtual layout the column of
            the padded merged layout it copies, ``-1`` at padding.
        virtual_positions: ``[B, N_max]`` long, the virtual position of each column, ``-1`` at padding.
        group_sizes: ``[B, M_max]`` long, virtual positions per merged slot, 0 at padding.
        num_virtual: ``[B]`` long, ``N_b``.
        num_merged: ``[B]`` long, ``M_b``.
        padding_side: ``"left"`` (needed for ``generate``) or ``"right"`` (plain forward only).
    """

    groups: tuple[Tensor, ...]
    position_ids: Tensor
    attention_mask: Tensor
    group_index: Tensor
    virtual_positions: Tensor
    group_sizes: Tensor
    num_virtual: Tensor
    num_merged: Tensor
    padding_side: Literal["left", "right"] = "left"
    # Host copies of N_b / M_b (no device sync when building layouts) and a per-shape layout cache.
    _nv: tuple[int, ...] = field(default=(), repr=False, compare=False)
    _nm: tuple[int, ...] = field(default=(), repr=False, compare=False)
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)
    _tables: dict = field(default_factory=dict, repr=False, compare=False)  # prompt cos/sin, see _Layout

    @property
    def batch_size(self) -> int:
        return self.position_ids.shape[0]

    @property
    def max_merged(self) -> int:
        """``M_max``: the merged (model input) length."""
        return self.position_ids.shape[1]

    @property
    def max_virtual(self) -> int:
        """``N_max``: the longest virtual length."""
        return self.group_index.shape[1]

    @property
    def device(self) -> torch.device:
        return self.position_ids.device

    def merged_offsets(self) -> list[int]:
        """Index of each sequence's first real slot in the padded merged layout."""
        m = self.max_merged
        return [m - n if self.padding_side == "left" else 0 for n in self._nm]

    def pad(self, seqs: Sequence[Tensor], value: float | int = 0) -> Tensor:
        """Pad per-sequence merged inputs (``[M_b, ...]`` each) to ``[B, M_max, ...]`` in this layout."""
        return pad_merged(seqs, self, value)

    def unpad(self, x: Tensor) -> list[Tensor]:
        """Split a ``[B, M_max, ...]`` output (e.g. logits) back into per-sequence ``[M_b, ...]``."""
        if x.shape[:2] != (self.batch_size, self.max_merged):
            raise ValueError(
                f"expected a tensor of shape [{self.batch_size}, {self.max_merged}, ...], got {tuple(x.shape)}"
            )
        return [x[b, o : o + m] for b, (o, m) in enumerate(zip(self.merged_offsets(), self._nm))]

    def to(self, device: torch.device | str) -> "VTUBatch":
        """A copy of this batch on ``device``."""
        def mv(t: Tensor) -> Tensor:
            return t.to(device)

        return VTUBatch(
            tuple(mv(g) for g in self.groups), mv(self.position_ids), mv(self.attention_mask),
            mv(self.group_index), mv(self.virtual_positions), mv(self.group_sizes), mv(self.num_virtual),
            mv(self.num_merged), self.padding_side, self._nv, self._nm,
        )


def concat_groups(parts: Sequence[int | Tensor]) -> Tensor:
    """Build one sequence's ``groups [N]`` from consecutive parts, in order.

    Each part is either an ``int`` n (a run of n text tokens, each its own slot) or a 1-D LongTensor
    ``local [n]`` (an image's group map with values ``0..k-1``, e.g. a DToMe source map row with the
    CLS column dropped and shifted). Slots are numbered consecutively across parts, so the merged
    sequence is: text slots, then the image's k merged tokens in slot order, then text, ...

    >>> concat_groups([2, torch.tensor([0, 0, 1, 0]), 1]).tolist()
    [0, 1, 2, 2, 3, 2, 4]
    """
    out: list[Tensor] = []
    offset = 0
    device = next((p.device for p in parts if isinstance(p, Tensor)), None)
    for i, part in enumerate(parts):
        if isinstance(part, Tensor):
            if part.dim() != 1 or part.is_floating_point() or part.dtype == torch.bool:
                raise ValueError(f"part {i}: expected a 1-D integer tensor, got {part.dtype} of shape {tuple(part.shape)}")
            if part.numel() == 0:
                continue
            local = part.long()
            if int(local.min()) < 0:
                raise ValueError(f"part {i}: group map values must be >= 0, got min {int(local.min())}")
            k = int(local.max()) + 1
            counts = torch.bincount(local, minlength=k)
            if bool((counts == 0).any()):
                missing = torch.nonzero(counts == 0).flatten().tolist()
                raise ValueError(f"part {i}: local slots {missing[:10]} of 0..{k - 1} own no position")
            out.append(local.to(device) + offset)
            offset += k
        else:
            n = int(part)
            if n < 0:
                raise ValueError(f"part {i}: a text run must have >= 0 tokens, got {n}")
            out.append(torch.arange(offset, offset + n, device=device))
            offset += n
    if not out:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(out)


def _check_groups(b: int, g: Tensor, num_merged: int | None) -> int:
    """Validate one sequence's groups and return its merged length M_b."""
    if not isinstance(g, Tensor) or g.dim() != 1:
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"groups[{b}] must be a 1-D LongTensor [N] (virtual position -> merged slot), got {shape}")
    if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise ValueError(f"groups[{b}] must hold integer slot indices, got dtype {g.dtype}")
    if g.numel() == 0:
        raise ValueError(f"groups[{b}] is empty; every sequence needs at least one virtual position")
    lo, hi = int(g.min()), int(g.max())
    if lo < 0:
        p = int(torch.nonzero(g < 0)[0])
        raise ValueError(f"groups[{b}][{p}] = {int(g[p])} is out of range; slot indices must be >= 0")
    m = hi + 1 if num_merged is None else int(num_merged)
    if hi >= m:
        p = int(torch.nonzero(g >= m)[0])
        raise ValueError(
            f"groups[{b}][{p}] = {int(g[p])} is out of range; sequence {b} has {m} merged slots, "
            f"so slot indices must be in 0..{m - 1}"
        )
    counts = torch.bincount(g.long(), minlength=m)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"groups[{b}] does not cover merged slots {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"every slot 0..{m - 1} must own at least one virtual position"
        )
    return m


def prepare_vtu(
    groups: Sequence[Tensor],
    padding_side: Literal["left", "right"] = "left",
    num_merged: Sequence[int] | None = None,
) -> VTUBatch:
    """Lay out a batch of groupings for VTU.

    Args:
        groups: one ``[N_b]`` LongTensor per sequence; ``groups[b][p]`` = merged slot of virtual
            position ``p`` (``0..M_b-1``, all covered).
        padding_side: ``"left"`` (what ``generate`` needs) or ``"right"`` (plain forward only).
        num_merged: optional ``M_b`` per sequence (e.g. the merged input lengths) to check the groups
            against; by default ``M_b = max(groups[b]) + 1``.

    Returns:
        A :class:`VTUBatch` on the device of the groups.

    Raises:
        ValueError: empty batch, a malformed group map, a slot out of range or not covered, or a
            wrong ``padding_side``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    groups = list(groups)
    if not groups:
        raise ValueError("prepare_vtu needs at least one sequence of groups")
    if num_merged is not None and len(num_merged) != len(groups):
        raise ValueError(f"num_merged has {len(num_merged)} entries for {len(groups)} sequences")
    device = groups[0].device if isinstance(groups[0], Tensor) else torch.device("cpu")
    ms = [_check_groups(b, g, None if num_merged is None else num_merged[b]) for b, g in enumerate(groups)]
    ns = [int(g.numel()) for g in groups]
    B, m_max, n_max = len(groups), max(ms), max(ns)
    left = padding_side == "left"

    position_ids = torch.zeros(B, m_max, dtype=torch.long, device=device)
    attention_mask = torch.zeros(B, m_max, dtype=torch.long, device=device)
    group_index = torch.full((B, n_max), -1, dtype=torch.long, device=device)
    virtual_positions = torch.full((B, n_max), -1, dtype=torch.long, device=device)
    group_sizes = torch.zeros(B, m_max, dtype=torch.long, device=device)
    for b, (g, n, m) in enumerate(zip(groups, ns, ms)):
        g = g.to(device=device, dtype=torch.long)
        counts = torch.bincount(g, minlength=m)
        # Representative position of a slot = its median member: the model rotates the merged q/k
        # there, VTU re-rotates by (virtual − representative); small shifts keep low precision tight,
        # and text tokens (groups of one) get shift 0, i.e. exactly the stock computation.
        order = torch.argsort(g, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rep = order[starts + (counts - 1) // 2]
        rep[m - 1] = n - 1  # generate continues at the last position + 1 = N_b
        mo = m_max - m if left else 0
        vo = n_max - n if left else 0
        position_ids[b, mo : mo + m] = rep
        attention_mask[b, mo : mo + m] = 1
        group_sizes[b, mo : mo + m] = counts
        group_index[b, vo : vo + n] = g + mo
        virtual_positions[b, vo : vo + n] = torch.arange(n, device=device)
    return VTUBatch(
        groups=tuple(groups),
        position_ids=position_ids,
        attention_mask=attention_mask,
        group_index=group_index,
        virtual_positions=virtual_positions,
        group_sizes=group_sizes,
        num_virtual=torch.tensor(ns, dtype=torch.long, device=device),
        num_merged=torch.tensor(ms, dtype=torch.long, device=device),
        padding_side=padding_side,
        _nv=tuple(ns),
        _nm=tuple(ms),
    )


def pad_merged(seqs: Sequence[Tensor], batch: VTUBatch, value: float | int = 0) -> Tensor:
    """Pad per-sequence merged inputs to the batch layout.

    Args:
        seqs: ``B`` tensors ``[M_b, ...]`` (merged ``inputs_embeds [M_b, C]`` or ``input_ids [M_b]``);
            ``M_b`` must equal the batch's merged length of that sequence.
        batch: the layout from :func:`prepare_vtu`.
        value: the padding value (a pad token id for ids, 0 for embeddings).

    Returns:
        ``[B, M_max, ...]`` with padding on ``batch.padding_side``.
    """
    seqs = list(seqs)
    if len(seqs) != batch.batch_size:
        raise ValueError(f"got {len(seqs)} sequences for a VTU batch of {batch.batch_size}")
    for b, (x, m) in enumerate(zip(seqs, batch._nm)):
        if x.dim() < 1 or x.shape[0] != m:
            raise ValueError(
                f"sequence {b} has merged length {x.shape[0] if x.dim() else 0}, but its groups have {m} merged slots"
            )
        if x.shape[1:] != seqs[0].shape[1:]:
            raise ValueError(f"sequence {b} has trailing shape {tuple(x.shape[1:])}, sequence 0 {tuple(seqs[0].shape[1:])}")
    ref = seqs[0]
    out = ref.new_full((batch.batch_size, batch.max_merged, *ref.shape[1:]), value)
    for b, (x, o) in enumerate(zip(seqs, batch.merged_offsets())):
        out[b, o : o + x.shape[0]] = x.to(out.device)
    return out


@contextlib.contextmanager
def vtu_context(batch: VTUBatch | None) -> Iterator[VTUBatch | None]:
    """Make ``batch`` the VTU state of every VTU-enabled model call inside the block.

    ``None`` switches VTU off inside the block (the registered attention then is stock sdpa).
    """
    if batch is not None and not isinstance(batch, VTUBatch):
        raise TypeError(f"vtu_context expects a VTUBatch (from prepare_vtu), got {type(batch).__name__}")
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)


def current_vtu_batch() -> VTUBatch | None:
    """The batch set by the innermost :func:`vtu_context`, if any."""
    return _CURRENT.get()


# --------------------------------------------------------------------------------------------------
# Per-call layout: which virtual row copies which q/k/v column, at which RoPE shift, under which mask
# --------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    q_index: Tensor  # [B, Vq] long: column of `query` each virtual query row copies (0 where invalid)
    q_shift: Tensor  # [B, Vq] float: virtual position − position the column was rotated at
    q_valid: Tensor  # [B, Vq] bool
    k_index: Tensor  # [B, Vk] long: column of `key`/`value` (the cache) each virtual key copies
    k_shift: Tensor  # [B, Vk] float
    mask: Tensor  # [B, Vq, Vk] bool, True = may attend; invalid query rows attend everything (discarded)
    q_count: Tensor  # [B, Sq] float: virtual rows per query column (0 at padding)
    identity_q: bool  # every query column is exactly one virtual row, in order (decode)
    expected_positions: Tensor  # [B, Sq] long: the position_ids the model must have rotated q at
    # the merged prompt's virtual layout (`prompt_*` [B, N_max]); in decode the keys are that followed
    # by `m_max` onwards (generated tokens, shift 0), so only the prompt part is gathered and rotated
    prompt_index: Tensor
    prompt_shift: Tensor
    m_max: int
    tables: dict  # the batch's cache of prompt cos/sin, shared by all layers and decode steps
    # what SDPA needs: (None, True) when `mask` is plain causal, (None, False) when it allows all
    sdpa_mask: Tensor | None = None
    sdpa_causal: bool = False

    def prompt_rotation(self, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin ``[B, 1, N_max, D/2]`` turning each prompt copy to its virtual position (cached)."""
        key = (dtype, self.prompt_shift.device, inv_freq.data_ptr(), inv_freq._version)
        if key not in self.tables:
            self.tables.clear()
            cos, sin = _angles(self.prompt_shift, inv_freq)
            self.tables[key] = (cos[:, None].to(dtype), sin[:, None].to(dtype))
        return self.tables[key]


def _build_layout(batch: VTUBatch, q_len: int, kv_len: int, device: torch.device) -> _Layout:
    B, m_max = batch.batch_size, batch.max_merged
    gi = batch.group_index.to(device)
    p_valid = gi >= 0
    p_index = gi.clamp(min=0)
    p_vpos = batch.virtual_positions.to(device)
    reps = batch.position_ids.to(device)
    p_shift = torch.where(p_valid, p_vpos - reps.gather(1, p_index), 0).float()

    unpadded = min(batch._nv) == batch.max_virtual  # then virtual column = virtual position
    if q_len == kv_len:  # prefill: queries and keys are the merged prompt
        mask = (p_vpos[:, None, :] <= p_vpos[:, :, None]) & p_valid[:, None, :]
        mask |= ~p_valid[:, :, None]  # no fully-masked rows (NaN); those rows are discarded anyway
        return _Layout(
            q_index=p_index, q_shift=p_shift, q_valid=p_valid, k_index=p_index, k_shift=p_shift, mask=mask,
            q_count=batch.group_sizes.to(device).float(), identity_q=False, expected_positions=reps,
            prompt_index=p_index, prompt_shift=p_shift, m_max=m_max, tables=batch._tables,
            sdpa_mask=None if unpadded else mask[:, None], sdpa_causal=unpadded,
        )

    # decode: the cache holds the merged prompt (M_max columns) then t generated tokens, each
    # generated token i rotated at its own virtual position N_b + i (shift 0).
    t = kv_len - m_max
    n_b = batch.num_virtual.to(device)[:, None]
    gen = torch.arange(t, device=device)
    k_index = torch.cat([p_index, (m_max + gen).expand(B, t)], 1)
    k_shift = torch.cat([p_shift, torch.zeros(B, t, device=device)], 1)
    k_valid = torch.cat([p_valid, torch.ones(B, t, dtype=torch.bool, device=device)], 1)
    k_vpos = torch.cat([p_vpos, n_b + gen], 1)
    q_vpos = n_b + (t - q_len) + torch.arange(q_len, device=device)
    mask = (k_vpos[:, None, :] <= q_vpos[:, :, None]) & k_valid[:, None, :]
    return _Layout(
        q_index=torch.arange(q_len, device=device).expand(B, q_len), q_shift=torch.zeros(B, q_len, device=device),
        q_valid=torch.ones(B, q_len, dtype=torch.bool, device=device), k_index=k_index, k_shift=k_shift, mask=mask,
        q_count=torch.ones(B, q_len, device=device), identity_q=True, expected_positions=q_vpos,
        prompt_index=p_index, prompt_shift=p_shift, m_max=m_max, tables=batch._tables,
        sdpa_mask=None if (unpadded and q_len == 1) else mask[:, None],
    )


def _layout_for(batch: VTUBatch, query: Tensor, key: Tensor) -> _Layout:
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
    key_ = (q_len, kv_len, str(query.device))
    lay = batch._layouts.get(key_)
    if lay is None:
        lay = _build_layout(batch, q_len, kv_len, query.device)
        batch._layouts.clear()  # one entry: all layers of one call share it; decode steps move on
        batch._layouts[key_] = lay
    return lay


# --------------------------------------------------------------------------------------------------
# The two attention computations (pure torch)
# --------------------------------------------------------------------------------------------------


def _angles(shift: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, V, F]`` of the pure RoPE angles ``shift * inv_freq`` (float32)."""
    ang = shift[..., None].float() * inv_freq.float().to(shift.device)
    return ang.cos(), ang.sin()


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


def _group_mean(out: Tensor, lay: _Layout, s_q: int) -> Tensor:
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


def vtu_attention_fast(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lay: _Layout,
    inv_freq: Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> Tensor:
    """Fast VTU attention: gather q/k/v to virtual length, re-rotate, causal SDPA, group mean.

    Args:
        query: ``[B, H, Sq, D]`` rotated by the model at the slots' representative positions.
        key, value: ``[B, H_kv, S_kv, D]`` (the cache, GQA not repeated).
        lay: the call's layout.
        inv_freq: ``[D/2]`` pure RoPE inverse frequencies.

    Returns:
        ``[B, Sq, H, D]`` as transformers' attention functions do.
    """
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


def _rows_by_column(lay: _Layout, s_q: int) -> tuple[Tensor, Tensor]:
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


def vtu_attention_exact(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lay: _Layout,
    inv_freq: Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> Tensor:
    """Exact VTU attention by the RoPE decomposition on merged length (same contract as the fast one).

    With ``rotate_half`` RoPE, for merged query i and key j (as rotated by the model) and frequency f:
    ``dot = q1·k1 + q2·k2``, ``cross = q2·k1 − q1·k2``. For virtual rows a ∈ i, b ∈ j with extra
    rotations α_a, β_b (virtual minus representative position, times θ_f):

    ``score(a, b) = Σ_f dot·cos(α−β) − cross·sin(α−β)
                  = Σ_f cos α·(dot cos β + cross sin β) + sin α·(dot sin β − cross cos β)``.

    Q and K are never expanded: dot/cross are formed per merged pair (as ``q·conj(k) = dot + i·cross``
    with ``q = q1 + i·q2``), turned by the key side's ``e^{-iβ}`` per virtual key, then combined with the
    query side's cos/sin α by one small matmul per query slot (its virtual rows share dot/cross). Values are not expanded either: each key group's softmax weights
    are summed and multiplied with the merged V; each query slot's rows are averaged. Works in chunks of
    query slots (largest groups first) to bound memory; computed in float32.
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
    b_cos, b_sin = _angles(lay.k_shift, inv_freq)
    key_turn = torch.complex(b_cos, -b_sin)[:, None, None, None]  # e^{-iβ}, [B, 1, 1, 1, Vk, F]
    a_cos, a_sin = _angles(lay.q_shift, inv_freq)
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


# --------------------------------------------------------------------------------------------------
# transformers hook
# --------------------------------------------------------------------------------------------------


class _RopeSource:
    """Plain holder of a decoder's rotary embedding, stored on its attention modules.

    Not an ``nn.Module``, so it is not registered as a sub-module (state dict and ``modules()`` stay
    stock); ``inv_freq`` is read at call time so ``model.to(...)`` and dynamic RoPE are followed.
    """

    __slots__ = ("rotary",)

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary

    @property
    def inv_freq(self) -> Tensor:
        return self.rotary.inv_freq


_ROPE_ATTR = "_dymu_vtu_rope"
_HANDLE_ATTR = "_dymu_vtu"


def _check_positions(module: nn.Module, kwargs: dict[str, Any], lay: _Layout) -> None:
    """Refuse to run when the model rotated q/k at other positions than the VTU batch planned."""
    pos = kwargs.get("position_ids")
    expected = lay.expected_positions
    ok = pos is not None and pos.shape[-1] == expected.shape[-1]
    if ok:
        ok = bool(torch.equal(pos.to(expected.device).expand_as(expected), expected))
    if not ok:
        got = "none" if pos is None else f"{tuple(pos.shape)} starting {pos.reshape(-1)[:4].tolist()}"
        raise ValueError(
            "VTU: the model's position_ids do not match the VTU batch (expected "
            f"{tuple(expected.shape)} starting {expected.reshape(-1)[:4].tolist()}, got {got}). Pass "
            "position_ids=batch.position_ids and attention_mask=batch.attention_mask to forward/generate; "
            "without them generate numbers merged slots 0..M-1 and continues at M instead of N."
        )


def _vtu_attention(
    mode: str,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch = kwargs.pop("vtu_batch", None)
    if batch is None:
        batch = _CURRENT.get()
    if batch is None:  # no VTU state: exactly stock sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rope = getattr(module, _ROPE_ATTR, None)
    if rope is None:
        raise ValueError(
            f"VTU attention was selected on {type(module).__name__} without dymu.vtu.enable_vtu(model, ...); "
            "enable it through enable_vtu so the decoder's RoPE frequencies are known"
        )
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"VTU does not support sliding-window attention (sliding_window={kwargs['sliding_window']})")
    lay = _layout_for(batch, query, key)
    if getattr(module, "layer_idx", 0) == 0:  # one check per forward is enough
        _check_positions(module, kwargs, lay)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    fn = vtu_attention_fast if mode == "fast" else vtu_attention_exact
    return fn(query, key, value, lay, rope.inv_freq, scaling, dropout), None


def _vtu_fast(module, query, key, value, attention_mask, **kwargs):
    return _vtu_attention("fast", module, query, key, value, attention_mask, **kwargs)


def _vtu_exact(module, query, key, value, attention_mask, **kwargs):
    return _vtu_attention("exact", module, query, key, value, attention_mask, **kwargs)


def _vtu_mask(*args: Any, **kwargs: Any):
    """Mask builder registered under the VTU names: the stock sdpa mask (merged layout).

    Outside a VTU context the attention function is stock sdpa and needs exactly this mask; inside one
    it builds its own mask at virtual length, so creating the merged one is skipped.
    """
    from transformers.masking_utils import sdpa_mask

    if _CURRENT.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for mode, fn in (("fast", _vtu_fast), ("exact", _vtu_exact)):
        AttentionInterface.register(ATTN_IMPLEMENTATIONS[mode], fn)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATIONS[mode], _vtu_mask)
    _REGISTERED = True


@dataclass
class _Handle:
    mode: str
    previous: str
    config_key: str | None


def _set_impl(model: nn.Module, config_key: str | None, name: str) -> None:
    model.set_attn_implementation(name if config_key is None else {config_key: name})


def enable_vtu(model: nn.Module, mode: VTUMode = "fast") -> nn.Module:
    """Switch the text decoder of ``model`` to VTU attention (``"off"`` = :func:`disable_vtu`).

    Works on a ``*ForCausalLM``, a bare decoder model, or a VLM whose text model is Llama, Qwen2 or
    Mistral; for a VLM only the text sub-config is switched, so the vision tower keeps its attention.
    Nothing changes until a :class:`VTUBatch` is supplied (by :func:`vtu_context` or ``vtu_batch=``).

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: unknown mode, or a model VTU does not support (see :mod:`dymu.llm`).
    """
    if mode == "off":
        return disable_vtu(model)
    if mode not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"vtu mode must be one of 'fast', 'exact', 'off'; got {mode!r}")
    from dymu.llm import find_decoder

    info = find_decoder(model)
    _register()
    handle = getattr(model, _HANDLE_ATTR, None)
    previous = handle.previous if handle is not None else info.config._attn_implementation
    name = ATTN_IMPLEMENTATIONS[mode]
    _set_impl(model, info.config_key, name)
    if info.config._attn_implementation != name:
        raise ValueError(
            f"VTU: {type(model).__name__} did not accept attn_implementation {name!r} "
            f"(it stays {info.config._attn_implementation!r}); the model must support transformers' AttentionInterface"
        )
    source = _RopeSource(info.rotary)
    for attn in info.attentions:
        setattr(attn, _ROPE_ATTR, source)
    setattr(model, _HANDLE_ATTR, _Handle(mode, previous or "sdpa", info.config_key))
    return model


def disable_vtu(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_vtu`: restore the previous attention implementation; no-op if not enabled."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        return model
    _set_impl(model, handle.config_key, handle.previous)
    for module in model.modules():
        if _ROPE_ATTR in module.__dict__:
            delattr(module, _ROPE_ATTR)
    delattr(model, _HANDLE_ATTR)
    return model


def vtu_mode(model: nn.Module) -> VTUMode:
    """``"fast"``, ``"exact"`` or ``"off"`` for ``model``."""
    handle = getattr(model, _HANDLE_ATTR, None)
    return "off" if handle is None else handle.mode  # type: ignore[return-value]


def _model_inputs(batch: VTUBatch, kwargs: dict[str, Any]) -> dict[str, Any]:
    for name in ("attention_mask", "position_ids"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} comes from the VTU batch; do not pass it")
    inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        inputs = kwargs.get("input_ids")
    device = inputs.device if isinstance(inputs, Tensor) else batch.device
    kwargs["attention_mask"] = batch.attention_mask.to(device)
    kwargs["position_ids"] = batch.position_ids.to(device)
    return kwargs


def vtu_forward(model: nn.Module, batch: VTUBatch, **kwargs: Any) -> Any:
    """``model(**kwargs)`` with the batch's attention mask and position ids, inside :func:`vtu_context`.

    Pass merged ``inputs_embeds``/``input_ids`` already padded with :meth:`VTUBatch.pad`.
    """
    with vtu_context(batch):
        return model(**_model_inputs(batch, kwargs))


def vtu_generate(model: nn.Module, batch: VTUBatch, **kwargs: Any) -> Any:
    """``model.generate(**kwargs)`` with the batch's attention mask and position ids, inside :func:`vtu_context`."""
    with vtu_context(batch):
        return model.generate(**_model_inputs(batch, kwargs))
