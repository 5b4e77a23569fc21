"""What VTU's attention functions know of positions: the decoder's RoPE frequencies (:class:`RopeSource`), and the
checks that the model rotated q/k where the VTU batch planned (a forgotten ``position_ids=`` would otherwise give
wrong numbers silently).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dymu.vtu.batch import VTUBatch
from dymu.vtu.layout import Layout
from dymu.vtu.mrope import MROPE_COMPONENTS, frequency_matrix, is_mrope, mrope_components

__all__ = ["RopeSource", "check_rope_kind", "check_call_positions"]


class RopeSource:
    """Plain holder of a decoder's rotary embedding, stored on its attention modules.

    Not an ``nn.Module``, so it is not registered as a sub-module (state dict and ``modules()`` stay
    stock); ``inv_freq`` is read at call time so ``model.to(...)`` and dynamic RoPE are followed.
    M-RoPE (:mod:`dymu.vtu.mrope`): ``inv_freq`` is the ``[3, F]`` frequency matrix (built once per ``inv_freq``
    tensor, so the kernels' per-call tables stay cached), and ``positions`` the M-RoPE position ids the rotary
    embedding last received (recorded by a forward pre-hook, since attention functions never see them).
    """

    __slots__ = ("rotary", "components", "positions", "hook", "_matrix")

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.components = mrope_components(rotary) if is_mrope(rotary) else None
        self.positions: Tensor | None = None
        self.hook = None
        self._matrix: tuple[tuple, Tensor] | None = None
        if self.components is not None:
            self.hook = rotary.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.positions = args[1] if len(args) > 1 else kwargs.get("position_ids")

    @property
    def inv_freq(self) -> Tensor:
        inv_freq = self.rotary.inv_freq
        if self.components is None:
            return inv_freq
        key = (inv_freq.data_ptr(), inv_freq._version, inv_freq.device)
        if self._matrix is None or self._matrix[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: the kernels key tables by _version
                self._matrix = (key, frequency_matrix(inv_freq, self.components))
        return self._matrix[1]


def check_rope_kind(rope: RopeSource, batch: VTUBatch) -> None:
    """Refuse a batch whose positions do not fit the decoder's RoPE (1-D vs M-RoPE and its components)."""
    comps = None if batch.slot_rope_positions is None else batch.slot_rope_positions.shape[-1]
    if rope.components is None and comps is not None:
        raise ValueError("VTU: the batch has M-RoPE positions (prepare_vtu(positions=...)), but this decoder uses "
                         "1-D RoPE; build the batch without positions")
    if rope.components is not None and comps is None:
        raise ValueError("VTU: this decoder uses M-RoPE; give prepare_vtu the (3, N) position ids of every virtual "
                         "position (positions=[...], e.g. get_rope_index on the unmerged sequence)")
    if rope.components is not None and comps != MROPE_COMPONENTS:
        raise ValueError(f"VTU: this decoder's M-RoPE has {MROPE_COMPONENTS} position components (t, h, w); the "
                         f"batch's positions have {comps} rows")


def _check_mrope_positions(rope: RopeSource, lay: Layout) -> None:
    """Refuse to run when an M-RoPE model rotated q/k at other (t, h, w) positions than the VTU batch planned."""
    expected = lay.expected_rope.permute(2, 0, 1)  # [P, B, Sq]
    pos = rope.positions
    ok = pos is not None and pos.dim() == 3 and pos.shape[-1] == expected.shape[-1]
    if ok:
        pos = pos[-expected.shape[0]:] if pos.shape[0] > expected.shape[0] else pos
        ok = bool(torch.equal(pos.to(expected.device).expand_as(expected), expected))
    if not ok:
        got = "none" if pos is None else f"{tuple(pos.shape)}: {pos[..., :1, :4].tolist()}"
        raise ValueError(
            f"VTU: the model's M-RoPE position ids do not match the VTU batch (expected {tuple(expected.shape)}: "
            f"{expected[:, :1, :4].tolist()}, got {got}). Pass position_ids=batch.model_position_ids to "
            "forward/generate; positions numbered from the merged slots would continue at M instead of the stock "
            "positions."
        )


def check_call_positions(rope: RopeSource, kwargs: dict[str, Any], lay: Layout) -> None:
    """Refuse to run when the model rotated q/k at other positions than the VTU batch planned."""
    if rope.components is not None:
        return _check_mrope_positions(rope, lay)
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
