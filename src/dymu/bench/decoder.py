"""Random decoder layers of a 7B model's shape and the merged sequences :mod:`dymu.bench.vtu_prefill` times."""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaModel, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

#: Default layer shapes per ``--family``.
SHAPES = {
    "llama": dict(hidden=4096, mlp=11008, heads=32, kv_heads=None),
    "qwen2_5_vl": dict(hidden=3584, mlp=18944, heads=28, kv_heads=4),
}


def grid_shape(n: int) -> tuple[int, int]:
    """``(H, W)`` with ``H * W == n`` and ``H <= W`` as close as possible (an image of ``n`` LLM tokens)."""
    h = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return h, n // h


def mrope_positions(before: int, n_visual: int, after: int) -> torch.Tensor:
    """``[3, N]`` stock M-RoPE positions of text, one ``H x W`` image (:func:`grid_shape`), text."""
    h, w = grid_shape(n_visual)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([torch.zeros(h * w, dtype=torch.long), rows.flatten(), cols.flatten()]) + before
    text_after = torch.arange(after) + before + max(h, w)
    return torch.cat([torch.arange(before).expand(3, -1), image, text_after.expand(3, -1)], 1)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random decoder layers of ``args.family``'s shape (only shapes matter for time)."""
    shape = dict(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=32,
                 max_position_embeddings=4096)
    if args.family == "llama":
        config, model_cls = LlamaConfig(**shape), LlamaModel
    else:
        half = args.hidden // args.heads // 2  # rotary frequencies: t, h, w sections in Qwen2.5-VL's 16:24:24
        section = [half // 4, (half - half // 4) // 2]
        section.append(half - sum(section))
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
        config, model_cls = Qwen2_5_VLTextConfig(**shape, rope_parameters=rope), Qwen2_5_VLTextModel
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return model_cls(config).to(dtype).eval()


def visual_groups(n_visual: int, n_merged: int, generator: torch.Generator) -> torch.Tensor:
    """A random DToMe-like group map: every slot covered, slots numbered by their first member."""
    slot = torch.randint(0, n_merged, (n_visual,), generator=generator)
    slot[torch.randperm(n_visual, generator=generator)[:n_merged]] = torch.arange(n_merged)
    first = torch.full((n_merged,), n_visual).scatter_reduce(0, slot, torch.arange(n_visual), "amin")
    rank = torch.empty(n_merged, dtype=torch.long)
    rank[torch.argsort(first)] = torch.arange(n_merged)
    return rank[slot]
