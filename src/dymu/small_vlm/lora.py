"""LoRA on the small VLM's language model: adapters for training, their tensors in a projector file, and merging
them into the linear layers on load.

Minimal on purpose (no peft), so that the training state and the merge stay under dymu's control. A projector file
stores each adapter as ``lora.<module path>.A`` (``[rank, in]``), ``.B`` (``[out, rank]``) and ``.scale``; merged,
the layer's weight becomes ``W + scale · B A``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LORA_PREFIX = "lora."
LORA_SCALE = 2.0  # alpha / rank with alpha = 2 * rank


class LoRALinear(nn.Module):
    """``base(x) + scale · x Aᵀ Bᵀ``; B starts at zero, so a new adapter leaves the layer as it was."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = LORA_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def lora_targets(language_model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The ``nn.Linear`` modules of ``language_model`` whose last name part is in ``names`` (e.g. q_proj)."""
    return {
        path: mod
        for path, mod in language_model.named_modules()
        if isinstance(mod, torch.nn.Linear) and path.rsplit(".", 1)[-1] in names
    }


def add_lora(model: torch.nn.Module, rank: int, targets: tuple[str, ...], seed: int) -> dict[str, LoRALinear]:
    """Wrap the target linear layers of the language model with LoRA (B = 0 at start); returns the adapters by
    module path (the order of ``named_modules``, which the optimizer state follows)."""
    lm = model.model.language_model
    gen = torch.Generator().manual_seed(seed + 1)
    adapters = {}
    for path, linear in lora_targets(lm, targets).items():
        parent_path, attr = path.rsplit(".", 1)
        wrapped = LoRALinear(linear, rank, gen)
        setattr(lm.get_submodule(parent_path), attr, wrapped)
        adapters[path] = wrapped
    return adapters


def lora_tensors(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The adapters' A and B under their ``lora.`` keys (copies on CPU: the training state)."""
    tensors = {}
    for path, a in adapters.items():
        tensors[f"{LORA_PREFIX}{path}.A"] = a.A.detach().cpu().clone()
        tensors[f"{LORA_PREFIX}{path}.B"] = a.B.detach().cpu().clone()
    return tensors


def lora_scales(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The adapters' scales under their ``lora.<path>.scale`` keys, as a projector file stores them."""
    return {f"{LORA_PREFIX}{path}.scale": torch.tensor(a.scale) for path, a in adapters.items()}


@torch.no_grad()
def merge_lora(language_model: torch.nn.Module, lora: dict[str, dict[str, torch.Tensor]]) -> None:
    """Add each adapter's ``scale · B A`` (``{module path: {"A", "B", "scale"}}``) to its linear layer's weight."""
    modules = dict(language_model.named_modules())
    for name, parts in lora.items():
        linear = modules[name]
        delta = (parts["B"].float() @ parts["A"].float()) * parts["scale"].float()
        linear.weight += delta.to(linear.weight.dtype)
