"""The peers' families of token reduction, selectable like DyMU (``method=`` of ``enable_dymu`` / ``dymu.vlm.load``,
``dymu generate/eval --method``, lmms-eval ``method=``), each keeping ``token_budget`` visual tokens per image:

* ``"dymu"`` — DToMe thresholds (content-dependent counts) + VTU; ``token_budget`` there calibrates the offset;
* ``"tome"`` — fixed-count ToMe in the same tower (``mode="fixed"``, constant schedule): every image merges
  ``patches - token_budget`` tokens, VTU as for DyMU;
* ``"prune"`` — the stock tower; keep the ``token_budget`` patches the CLS token attends to most in the feature
  layer's block (heads averaged; VisionZip's dominant tokens), in spatial order at consecutive positions;
* ``"random"`` — keep a random subset of that size (seeded per image), the floor.

The selections drop patches, so no token stands for a dropped one: they run with VTU off.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

import dymu

Method = Literal["dymu", "tome", "prune", "random"]
METHODS: tuple[str, ...] = ("dymu", "tome", "prune", "random")
SELECTIONS = ("prune", "random")


def check_method(method: str, token_budget: Any, thresholds: Any, vtu: str | None) -> str:
    """Check a method's settings (one-line errors) and return the VTU mode it runs with."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "dymu":
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"method={method!r} needs token_budget, a positive whole number of tokens per image, "
                             f"got {token_budget!r}")
        if thresholds is not None:
            raise ValueError(f"method={method!r} takes no thresholds (they are DyMU's); drop thresholds")
    if method in SELECTIONS:
        if vtu not in (None, "off"):
            raise ValueError(f"method={method!r} drops patches, so VTU has nothing to unmerge: use vtu='off', got {vtu!r}")
        return "off"
    return "fast" if vtu is None else vtu


def configure_tome(tower: nn.Module, patches: int, token_budget: int, layer: int = -1) -> None:
    """Fixed-count ToMe on a patched tower: ``patches - token_budget`` merges, the same number in every block up to
    the one that produces hidden state ``layer`` (the feature layer; later blocks do not reach the LLM)."""
    if token_budget > patches:
        raise ValueError(f"token_budget {token_budget} exceeds the {patches} patches per image")
    state = dymu.get_state(tower)
    used = layer % (state.num_layers + 1)
    schedule = dymu.merge_schedule("constant", patches - token_budget, used) + [0] * (state.num_layers - used)
    if state.mode != "fixed" or state.merge_counts != schedule:
        dymu.configure(tower, merge_counts=schedule, mode="fixed")


def _attention_parts(block: nn.Module) -> tuple[nn.Module, nn.Module, int, float]:
    """The pre-attention norm, the attention module, its heads and scale of a DINOv2 or CLIP block."""
    if hasattr(block, "attention") and hasattr(block, "norm1"):  # DINOv2 (transformers)
        return block.norm1, block.attention, block.attention.num_attention_heads, block.attention.scaling
    if hasattr(block, "self_attn") and hasattr(block, "layer_norm1"):  # CLIP / SigLIP
        return block.layer_norm1, block.self_attn, block.self_attn.num_heads, block.self_attn.scale
    raise ValueError(f"CLS-attention pruning does not know the block {type(block).__name__}: expected DINOv2 or CLIP")


def tower_blocks(tower: nn.Module) -> Sequence[nn.Module]:
    encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def cls_attention(tower: nn.Module, hidden_states: Sequence[Tensor], index: int) -> Tensor:
    """``[B, N]``: the CLS token's attention over the patches in the block that produces hidden state ``index``
    (the feature layer), heads averaged; recomputed from that block's input (SDPA returns no weights)."""
    norm, attn, heads, scaling = _attention_parts(tower_blocks(tower)[index - 1])
    x = norm(hidden_states[index - 1])
    b, n, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(b, 1, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, heads, -1).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1)  # [B, H, 1, N]
    return weights.mean(1)[:, 0, 1:]


def keep_indices(method: str, count: int, patches: int, attention: Tensor | None, seeds: Sequence[int]) -> Tensor:
    """``[B, count]`` kept patch indices in spatial order: the top-``count`` CLS attention (``"prune"``) or a
    ``randperm`` seeded per image (``"random"``)."""
    if count > patches:
        raise ValueError(f"token_budget {count} exceeds the {patches} patches per image")
    if method == "prune":
        keep = attention.topk(count, dim=-1).indices
    else:
        keep = torch.stack([torch.randperm(patches, generator=torch.Generator().manual_seed(int(s)))[:count]
                            for s in seeds])
    return keep.sort(dim=-1).values


def selection_groups(keep: Tensor, patches: int) -> list[Tensor]:
    """Per image ``[patches]``: each stock position mapped to a kept slot (the nearest kept patch before it), so the
    placeholders collapse to ``count`` (VTU is off: only the count matters)."""
    return [torch.searchsorted(k.cpu(), torch.arange(patches), right=True).sub(1).clamp(min=0) for k in keep]


@torch.no_grad()
def select_features(tower: nn.Module, pixel_values: Tensor, layer: int, drop_cls: bool, method: str, count: int,
                    seeds: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """Run the stock ``tower``; return the kept features ``[B, count, C]`` of ``layer`` and per image its groups."""
    out = tower(pixel_values, output_hidden_states=True)
    index = layer % len(out.hidden_states)
    feats = out.hidden_states[index][:, 1:] if drop_cls else out.hidden_states[index]
    if method == "prune" and not drop_cls:
        raise ValueError("CLS-attention pruning needs a CLS token (vision_feature_select_strategy='default')")
    n = feats.shape[1]
    attention = cls_attention(tower, out.hidden_states, index) if method == "prune" else None
    keep = keep_indices(method, count, n, attention, seeds)
    kept = torch.stack([feats[b, keep[b]] for b in range(feats.shape[0])])
    return kept, selection_groups(keep, n)
