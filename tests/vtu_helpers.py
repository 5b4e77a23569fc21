"""Helpers shared by the VTU tests (tests/test_vtu.py: 1-D RoPE decoders, tests/test_vtu_mrope.py: Qwen-VL M-RoPE):
sharp random weights, VTU logits of a batch, and the autograd check against the definition."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dymu.vtu import VTUBatch, disable_vtu, enable_vtu, prepare_vtu, vtu_forward, vtu_kernels

Logits = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # merged inputs -> logits per sequence


@torch.no_grad()
def redraw_except_norms(named_parameters: Iterable[tuple[str, nn.Parameter]], std: float = 0.3) -> None:
    """Re-draw every parameter but the norms' from N(0, std) with torch's global generator: with the default 0.02
    a tiny decoder attends almost uniformly and position bugs hide."""
    for name, p in named_parameters:
        if "norm" not in name:
            p.normal_(0.0, std)


def vtu_logits(model: nn.Module, groups: list[torch.Tensor], embeds: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    """Logits per sequence (merged length) of one VTU forward over the batch ``prepare_vtu(groups, **kw)``."""
    batch = prepare_vtu(groups, **kw)
    with torch.no_grad():
        out = vtu_forward(model, batch, inputs_embeds=batch.pad(embeds))
    return batch.unpad(out.logits)


def maxdiff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def definition_and_vtu_gradients(
    model: nn.Module, embeds: list[torch.Tensor], weights: list[torch.Tensor], weight: nn.Parameter,
    definition: Logits, prepare: Callable[[], VTUBatch],
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Gradients of ``Σ logits·weights`` with respect to the merged inputs and ``weight``: the definition's, and
    per VTU kernel (``"fast blocked"``, ``"fast sdpa"``, ``"exact"``) those of a forward on ``prepare()``'s batch.
    VTU is off on ``model`` afterwards."""

    def gradients(logits_of: Logits) -> list[torch.Tensor]:
        model.zero_grad()
        inputs = [e.clone().requires_grad_(True) for e in embeds]
        loss = sum((logits * w).sum() for logits, w in zip(logits_of(inputs), weights))
        loss.backward()
        return [x.grad for x in inputs] + [weight.grad.clone()]

    with torch.enable_grad():
        want = gradients(definition)
        got = {}
        for name, mode, blocked in (("fast blocked", "fast", True), ("fast sdpa", "fast", False),
                                    ("exact", "exact", True)):
            enable_vtu(model, mode)
            batch = prepare()
            with vtu_kernels(prefill=None if blocked else "fast_sdpa"):
                got[name] = gradients(
                    lambda xs: batch.unpad(vtu_forward(model, batch, inputs_embeds=batch.pad(xs)).logits))
    disable_vtu(model)
    return want, got
