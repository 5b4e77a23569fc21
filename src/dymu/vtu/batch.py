"""VTU groups and batches (pure torch): one sequence's groups, and a batch of them laid out for the model.

* :func:`concat_groups` builds one sequence's ``groups [N]`` (virtual position -> merged slot);
* :func:`prepare_vtu` lays a batch of groupings out as a :class:`VTUBatch` (merged layout padded to ``M_max``,
  representative positions, masks); :meth:`VTUBatch.pad` pads merged inputs to it;
* :meth:`VTUBatch.layout` gives the :class:`~dymu.vtu.layout.Layout` of one attention call
  (:mod:`dymu.vtu.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from dymu.vtu.layout import Layout, call_layout
from dymu.vtu.mrope import check_positions

__all__ = ["VTUBatch", "concat_groups", "prepare_vtu"]


@dataclass
class VTUBatch:
    """Per-call VTU state for a batch of sequences, made by :func:`prepare_vtu` (see :mod:`dymu.vtu`).

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
        rope_positions: M-RoPE only (``None`` for 1-D RoPE): ``[B, N_max, P]`` long, the RoPE position components
            (``t, h, w``) of each column of the padded virtual layout, 0 at padding.
        slot_rope_positions: M-RoPE only: ``[B, M_max, P]`` long, the components each merged slot is rotated at
            (those of its representative virtual position), 0 at padding.
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
    rope_positions: Tensor | None = None
    slot_rope_positions: Tensor | None = None
    # Host copies of N_b / M_b (no device sync when building layouts), the layout of the last call shape
    # (all layers of one call share it; decode steps move on) and the prompt cos/sin (see Layout.tables).
    _nv: tuple[int, ...] = field(default=(), repr=False, compare=False)
    _nm: tuple[int, ...] = field(default=(), repr=False, compare=False)
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

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

    @property
    def model_position_ids(self) -> Tensor:
        """The ``position_ids`` to give the model's ``forward`` / ``generate``.

        1-D RoPE: :attr:`position_ids` ``[B, M_max]``. M-RoPE: ``[1 + P, B, M_max]``, as stock ``generate`` builds
        them for Qwen-VL: row 0 :attr:`position_ids` (the representative's index in the virtual sequence, the "text
        position" the model passes to attention), then the :attr:`slot_rope_positions` components. ``generate``
        continues every row at its last value + 1, which is where the stock model continues after the last token.
        """
        if self.slot_rope_positions is None:
            return self.position_ids
        return torch.cat([self.position_ids[None], self.slot_rope_positions.permute(2, 0, 1)])

    def merged_offsets(self) -> list[int]:
        """Index of each sequence's first real slot in the padded merged layout."""
        m = self.max_merged
        return [m - n if self.padding_side == "left" else 0 for n in self._nm]

    def pad(self, seqs: Sequence[Tensor], value: float | int = 0) -> Tensor:
        """Pad per-sequence merged inputs to this layout.

        Args:
            seqs: ``B`` tensors ``[M_b, ...]`` (merged ``inputs_embeds [M_b, C]`` or ``input_ids [M_b]``);
                ``M_b`` must equal this batch's merged length of that sequence.
            value: the padding value (a pad token id for ids, 0 for embeddings).

        Returns:
            ``[B, M_max, ...]`` with padding on ``padding_side``, on the device of ``seqs[0]``.
        """
        seqs = list(seqs)
        if len(seqs) != self.batch_size:
            raise ValueError(f"got {len(seqs)} sequences for a VTU batch of {self.batch_size}")
        for b, (x, m) in enumerate(zip(seqs, self._nm)):
            if x.dim() < 1 or x.shape[0] != m:
                got = x.shape[0] if x.dim() else 0
                raise ValueError(f"sequence {b} has merged length {got}, but its groups have {m} merged slots")
            if x.shape[1:] != seqs[0].shape[1:]:
                raise ValueError(
                    f"sequence {b} has trailing shape {tuple(x.shape[1:])}, sequence 0 {tuple(seqs[0].shape[1:])}"
                )
        ref = seqs[0]
        out = ref.new_full((self.batch_size, self.max_merged, *ref.shape[1:]), value)
        for b, (x, o) in enumerate(zip(seqs, self.merged_offsets())):
            out[b, o : o + x.shape[0]] = x.to(out.device)
        return out

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

        def mv_opt(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return VTUBatch(
            tuple(mv(g) for g in self.groups), mv(self.position_ids), mv(self.attention_mask),
            mv(self.group_index), mv(self.virtual_positions), mv(self.group_sizes), mv(self.num_virtual),
            mv(self.num_merged), self.padding_side, mv_opt(self.rope_positions), mv_opt(self.slot_rope_positions),
            self._nv, self._nm,
        )

    def layout(self, query: Tensor, key: Tensor) -> Layout:
        """The :class:`~dymu.vtu.layout.Layout` of an attention call with ``query [B, H, Sq, D]`` and
        ``key [B, H_kv, S_kv, D]`` (:func:`~dymu.vtu.layout.call_layout`)."""
        return call_layout(self, query, key)


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
    positions: Sequence[Tensor] | None = None,
) -> VTUBatch:
    """Lay out a batch of groupings for VTU.

    Args:
        groups: one ``[N_b]`` LongTensor per sequence; ``groups[b][p]`` = merged slot of virtual
            position ``p`` (``0..M_b-1``, all covered).
        padding_side: ``"left"`` (what ``generate`` needs) or ``"right"`` (plain forward only).
        num_merged: optional ``M_b`` per sequence (e.g. the merged input lengths) to check the groups
            against; by default ``M_b = max(groups[b]) + 1``.
        positions: M-RoPE decoders only (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): per sequence the ``[P, N_b]`` RoPE
            position components of every virtual position, as the stock model would rotate the unmerged sequence
            (``get_rope_index`` on it: ``(t, h, w)`` per image patch, text after an image at ``start + max(H, W)``).
            Each merged slot is rotated at its representative's components; VTU turns every copy to its own.

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
    comps = None if positions is None else check_positions(list(positions), ns)
    rope_positions = slot_rope = None
    if comps is not None:
        rope_positions = torch.zeros(B, n_max, comps, dtype=torch.long, device=device)
        slot_rope = torch.zeros(B, m_max, comps, dtype=torch.long, device=device)

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
        if positions is not None:
            pos = positions[b].to(device=device, dtype=torch.long).T  # [N_b, P]
            rope_positions[b, vo : vo + n] = pos
            slot_rope[b, mo : mo + m] = pos[rep]
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
        rope_positions=rope_positions,
        slot_rope_positions=slot_rope,
        _nv=tuple(ns),
        _nm=tuple(ms),
    )
