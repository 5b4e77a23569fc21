"""M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL text models) for VTU: which position component each frequency turns by.

M-RoPE gives every token three positions ``(t, h, w)`` and rotates each rotary frequency ``f`` by *one* of them,
``θ_f · pos[c(f)]``: Qwen2-VL / Qwen2.5-VL chunk the frequencies by ``mrope_section`` (``[16, 24, 24]``: the first
16 take t, the next 24 h, the last 24 w); Qwen3-VL interleaves them (``t h w t h w ...`` for ``3 · section[1|2]``
frequencies, t after that). Written as a frequency matrix ``W [P, F]`` with ``W[c(f), f] = θ_f`` and 0 elsewhere,
the angle of frequency ``f`` at positions ``pos [P]`` is ``Σ_c pos[c] · W[c, f]``: 1-D RoPE is the case ``P = 1``,
``W = θ``. The VTU kernels take such a matrix and position shifts with a trailing component axis and are otherwise
the same for both (:func:`dymu.vtu.ops.rope_angles`).

The section of each frequency is read from the stock rotary embedding itself (:func:`mrope_components` runs its
``recomposition_frequencies`` on the component indices), so chunked and interleaved layouts come out as the
installed transformers applies them.
"""

from __future__ import annotations

import torch
from typing import Sequence

from torch import Tensor, nn

__all__ = [
    "MROPE_MODEL_TYPES", "MROPE_COMPONENTS", "is_mrope", "mrope_components", "frequency_matrix", "check_positions",
]

#: ``model_type`` of the M-RoPE text decoders VTU was checked on.
MROPE_MODEL_TYPES: tuple[str, ...] = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
#: Position components of M-RoPE: temporal, height, width.
MROPE_COMPONENTS = 3


def is_mrope(rotary: nn.Module) -> bool:
    """Whether ``rotary`` is an M-RoPE embedding (it recomposes per-component frequencies)."""
    return hasattr(rotary, "recomposition_frequencies") and hasattr(rotary, "mrope_section")


def mrope_components(rotary: nn.Module) -> Tensor:
    """``[F]`` long: the position component (0 = t, 1 = h, 2 = w) each rotary frequency of ``rotary`` turns by.

    Probed from the stock ``recomposition_frequencies([3, 1, 1, F])`` fed each component's index as its "frequency":
    the first half of what comes back (the halves repeat) names the component per frequency.

    Raises:
        ValueError: ``rotary`` is not M-RoPE, or its recomposition is not one component per frequency.
    """
    if not is_mrope(rotary):
        raise ValueError(f"{type(rotary).__name__} is not an M-RoPE embedding (no recomposition_frequencies)")
    f = rotary.inv_freq.numel()
    probe = torch.arange(MROPE_COMPONENTS, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 1, f).clone()
    out = rotary.recomposition_frequencies(probe).reshape(-1)
    if out.numel() != 2 * f or not torch.equal(out[:f], out[f:]) or not torch.equal(out, out.round()):
        raise ValueError(
            f"VTU: {type(rotary).__name__}.recomposition_frequencies does not pick one of the {MROPE_COMPONENTS} "
            f"position components per frequency (probe gave {out.tolist()[:8]} ...); expected {2 * f} values in 0..2"
        )
    return out[:f].long()


def frequency_matrix(inv_freq: Tensor, components: Tensor, num_components: int = MROPE_COMPONENTS) -> Tensor:
    """``W [P, F]`` float32: ``W[components[f], f] = inv_freq[f]``, 0 elsewhere (see the module docstring)."""
    w = torch.zeros(num_components, inv_freq.numel(), dtype=torch.float32, device=inv_freq.device)
    w[components.to(inv_freq.device), torch.arange(inv_freq.numel(), device=inv_freq.device)] = inv_freq.float()
    return w


def check_positions(positions: Sequence[Tensor], ns: Sequence[int]) -> int:
    """Validate per-sequence position components ``[P, N_b]`` (``ns``: the virtual lengths ``N_b``); return ``P``.

    Raises:
        ValueError: a count, shape or dtype that does not fit, naming the sequence and what was expected.
    """
    if len(positions) != len(ns):
        raise ValueError(f"positions has {len(positions)} entries for {len(ns)} sequences")
    comps = None
    for b, (pos, n) in enumerate(zip(positions, ns)):
        if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[1] != n:
            shape = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
            raise ValueError(
                f"positions[{b}] must be a [P, N] LongTensor with N = {n} (the virtual length of groups[{b}]), "
                f"e.g. the (3, N) M-RoPE ids of get_rope_index on the unmerged sequence; got {shape}"
            )
        if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise ValueError(f"positions[{b}] must hold integer positions, got dtype {pos.dtype}")
        if comps is not None and pos.shape[0] != comps:
            raise ValueError(f"positions[{b}] has {pos.shape[0]} components, positions[0] {comps}")
        comps = pos.shape[0]
    return int(comps)
