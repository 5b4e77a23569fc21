"""Helpers shared by the VTU kernels (pure torch): RoPE angles and rotation, column gathers, per-call scratch buffers.

Every kernel (:mod:`dymu.vtu.fast_sdpa`, :mod:`dymu.vtu.fast_blocked_cpu`, :mod:`dymu.vtu.exact`) has the signature
:data:`VTUKernel`: ``(query, key, value, lay, inv_freq, scaling, dropout) -> [B, Sq, H, D]``, with

    query: ``[B, H, Sq, D]`` rotated by the model at the slots' representative positions.
    key, value: ``[B, H_kv, S_kv, D]`` (the cache, GQA not repeated).
    lay: the call's :class:`~dymu.vtu.layout.Layout` (:meth:`VTUBatch.layout <dymu.vtu.batch.VTUBatch.layout>`).
    inv_freq: ``[D/2]`` pure RoPE inverse frequencies (``rotate_half`` RoPE over the whole head), or for
        per-frequency positions (M-RoPE) the ``[P, D/2]`` frequency matrix of :mod:`dymu.vtu.mrope`, with the
        layout's shifts carrying a trailing component axis; the kernels are the same for both.
    scaling: the softmax scale; dropout: attention dropout probability.

:mod:`dymu.vtu.integration` picks the kernel of each call (its ``DISPATCH`` table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:  # layout.py imports this module for rope_angles
    from dymu.vtu.layout import Layout

__all__ = ["VTUKernel", "rope_angles", "rotate_", "gather_cols", "reusable", "scratch", "zeros"]

#: Signature shared by the kernels: ``(query, key, value, lay, inv_freq, scaling, dropout) -> [B, Sq, H, D]``.
VTUKernel = Callable[[Tensor, Tensor, Tensor, "Layout", Tensor, float, float], Tensor]


def rope_angles(shift: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin ``[..., F]`` of the pure RoPE angles (float32).

    1-D RoPE: ``shift [...]`` times ``inv_freq [F]``. Per-frequency positions (M-RoPE, :mod:`dymu.vtu.mrope`):
    ``shift [..., P]`` (one shift per position component) times the frequency matrix ``inv_freq [P, F]``, which has
    one nonzero per column, so each frequency turns by its own component's shift.
    """
    freqs = inv_freq.float().to(shift.device)
    ang = shift[..., None].float() * freqs if freqs.dim() == 1 else shift.float() @ freqs
    return ang.cos(), ang.sin()


def reusable(*tensors: Tensor) -> bool:
    """Buffers may be reused across layers: nothing here is recorded for autograd."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def scratch(plans: dict, name: str, like: Tensor, shape: tuple[int, ...], reuse: bool) -> Tensor | None:
    """An uninitialised ``shape`` buffer like ``like``, one per call layout (``plans``: its ``Layout.plans``) and
    name, which every layer of the call writes again (fresh large CPU allocations pay their page faults on every
    layer), so a VTU batch serves one forward at a time; None unless ``reuse`` (autograd records: the ops then
    allocate their outputs)."""
    if not reuse:
        return None
    key = ("scratch", name, shape, like.dtype, like.device, torch.is_inference_mode_enabled())
    buf = plans.get(key)
    if buf is None:
        buf = plans[key] = like.new_empty(shape)
    return buf


def zeros(plans: dict, name: str, like: Tensor, shape: tuple[int, ...], reuse: bool) -> Tensor:
    """:func:`scratch` filled with zeros, or new zeros."""
    buf = scratch(plans, name, like, shape, reuse)
    return like.new_zeros(shape) if buf is None else buf.zero_()


def gather_cols(x: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
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


def rotate_(x: Tensor, cos: Tensor, sin: Tensor, tmp: Tensor | None = None) -> Tensor:
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
