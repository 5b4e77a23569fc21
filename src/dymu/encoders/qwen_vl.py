"""DToMe inside the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers: what the three adapters share.

The design (reasons and measurements in ``docs/qwen_vl.md``, "Vision tower"):

* **Whole units.** The PatchMerger concatenates the 4 consecutive tokens of each 2×2 unit, so DToMe matches and
  merges *units*: the metric of a unit is its 4 tokens' keys (each averaged over heads) concatenated, and merging
  unit ``u`` into unit ``v`` averages them position-wise (token ``j`` of ``u`` with token ``j`` of ``v``), size
  weighted. The merger still sees 4-token units and stays stock. Sizes and source maps count units (cells of the
  merged grid the LLM sees).
* **Segments.** Tokens are packed ``[total_patches, dim]``; a *segment* is what may merge together: one frame of
  one image (Qwen2-VL, Qwen3-VL), one attention window (Qwen2.5-VL, so window attention stays window-local). The
  segments are padded into :class:`dymu.merge.TokenState` rows ``[segments, units, 4*dim]`` for the merge and
  packed again after it; ``cu_seqlens`` (frames) and the window bounds are recomputed from the new lengths.
  Video frames are separate segments: merging is per frame, never across time.
* **Positions.** A merged unit's token ``j`` takes the centroid of the 2-D RoPE positions of the tokens it covers
  (``position_rule="centroid"``; ``"first"``: its earliest unit's); cos/sin are recomputed after each merge.
* Later blocks attend proportionally (``log size`` added to the keys' logits); before any merge the stock
  attention runs, so merging off is the stock tower.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.encoders.base import DToMeState
from dymu.merge import TokenState, dtome_step, select_top, spatial_order
from dymu.thresholds import merge_schedule

PositionRule = Literal["centroid", "first"]
#: merges average units exactly: the authors' batch path divides by size + 1e-4 (dymu.merge), but they never merged
#: a Qwen tower, so there is nothing of theirs to reproduce here
EXACT_MEAN = 0.0
Rotary = Callable[[Tensor], tuple[Tensor, Tensor]]  # positions [T, 2] (float) -> cos, sin [T, head_dim]


@dataclass
class MergedImage:
    """One image (or video) out of a merged Qwen vision tower."""

    features: Tensor  # [k, out_dim] merger outputs, in raster order of each token's first cell (frame-major)
    source_map: Tensor  # [t*h*w/4] long: the output token covering each cell of the merged grid
    sizes: Tensor  # [k] float: cells per output token
    deepstack: list[Tensor] = field(default_factory=list)  # Qwen3-VL: [k, out_dim] per DeepStack layer, same groups


@dataclass
class QwenDToMeState(DToMeState):
    """:class:`DToMeState` plus the unit pass in flight and the last forward's per-image results.

    ``merge_counts`` (finding, fixed) count units per frame (a still image is one frame) at each block; finding
    merges the batch's ``frames * r`` best unit pairs over all segments, fixed mode (ToMe) each frame's ``r`` best
    over its segments (windows).
    """

    position_rule: PositionRule = "centroid"
    units: "UnitPass | None" = None
    images: list[MergedImage] = field(default_factory=list)


def make_block(parent: type) -> type:
    class DToMeQwenVisionBlock(parent):
        """Follows ``Qwen2VLVisionBlock.forward`` (the Qwen2.5-VL and Qwen3-VL blocks are the same). Changes: after
        a merge attention takes the size bias; after attention + residual the units are merged (metric: the keys
        captured from ``attn.qkv``); the MLP runs on the merged tokens."""

        def forward(self, hidden_states: Tensor, cu_seqlens: Tensor, position_embeddings=None, **kwargs) -> Tensor:
            units: UnitPass = self._dymu_dtome_state.units
            attn = units.attention(self.attn, self.norm1(hidden_states), cu_seqlens, position_embeddings, **kwargs)
            hidden_states = units.merge(self._dymu_index, hidden_states + attn, self._dymu_dtome_state.take_keys())
            return hidden_states + self.mlp(self.norm2(hidden_states))

    return DToMeQwenVisionBlock


class UnitPass:
    """The packed tokens of one tower forward, merged unit-wise within segments (module doc).

    ``hidden [T, C]`` in the tower's order, ``positions [T, 2]`` their (h, w), ``segments [S]`` tokens per
    segment (in order), ``frames [S]`` the frame (full-attention sequence) of each segment, ``cells [T / 4]`` each
    unit's (image, cell) as an index into the concatenated merged grids of all images, ``image_cells [I]`` cells
    per image.
    """

    def __init__(self, state: QwenDToMeState, hidden: Tensor, positions: Tensor, segments: Tensor, frames: Tensor,
                 cells: Tensor, image_cells: list[int], rotary: Rotary, unit: int) -> None:
        self.state, self.rotary, self.unit = state, rotary, unit
        self.frames, self.cells, self.image_cells = frames, cells, image_cells
        self.num_frames = int(frames[-1]) + 1 if len(frames) else 0
        counts = segments // unit
        self.mask = torch.arange(int(counts.max()), device=hidden.device)[None] < counts[:, None]
        self.positions0 = self.pad(positions.float())  # [S, U0, 4*2]: the original positions, for centroids
        self.bias: Tensor | None = None  # [T] float: log size of each token's unit, None before any merge
        self.position_embeddings = rotary(positions)
        state.begin(self.pad(hidden), self.mask)
        self._layout()
        self._stash: list[tuple[Tensor, Tensor]] = []

    # -- packed [T, C] <-> padded units [S, U, 4*C]
    def pad(self, packed: Tensor) -> Tensor:
        units = packed.reshape(-1, self.unit * packed.shape[-1])
        out = units.new_zeros(*self.mask.shape, units.shape[-1])
        out[self.mask] = units
        return out

    def pack(self, padded: Tensor) -> Tensor:
        return padded[self.mask].reshape(-1, padded.shape[-1] // self.unit)

    def _layout(self) -> None:
        """Attention bounds from the current segment lengths: ``cu_window_seqlens`` per segment, ``cu_seqlens``
        per frame (a frame's segments are consecutive)."""
        tokens = self.mask.sum(1) * self.unit
        self.cu_window_seqlens = F.pad(tokens.cumsum(0, dtype=torch.int32), (1, 0))
        per_frame = tokens.new_zeros(self.num_frames).index_add_(0, self.frames, tokens)
        self.cu_seqlens = F.pad(per_frame.cumsum(0, dtype=torch.int32), (1, 0))
        self.max_seqlen = int(per_frame.max()) if len(per_frame) else 0

    # -- called by the blocks
    def attention(self, attn: nn.Module, x: Tensor, cu_seqlens: Tensor, position_embeddings, **kwargs) -> Tensor:
        """Follows ``VisionAttention.forward`` (sdpa/eager, per segment). Change: ``log size`` of each key's unit is
        added to the logits. Before any merge it is the stock module."""
        if self.bias is None:
            return attn(x, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        # the same function in all three families' modeling files
        # why: transformers' model modules take seconds to import; loaded once a tower is patched
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        bounds = cu_seqlens.tolist()
        out = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            q_s, k_s, v_s = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, n_s, D]
            bias = self.bias[start:end].to(q.dtype)[None, None, :]
            o = F.scaled_dot_product_attention(q_s[None], k_s[None], v_s[None], attn_mask=bias, scale=attn.scaling)
            out.append(o[0].transpose(0, 1).reshape(end - start, -1))
        return attn.proj(torch.cat(out))

    def merge(self, layer: int, hidden: Tensor, keys: Tensor) -> Tensor:
        """Merge the units of ``hidden [T, C]`` by ``keys [1, T, D]``; returns the new packed hidden states."""
        state = self.state
        before = state.tokens
        tokens = TokenState(self.pad(hidden), before.sizes, before.source_map)
        metric = self.pad(keys[0])
        order = state.token_order
        if state.mode == "find":
            select = state.find_selection
            total = self.num_frames * state.merge_counts[layer]  # per frame: images of any size count alike

            def top(scores: Tensor, _r: int) -> tuple[Tensor, float]:
                candidates = int(torch.isfinite(scores).sum())
                if total > candidates:  # bipartite matching merges at most half of a segment's units per block
                    raise ValueError(f"block {layer}: cannot merge {state.merge_counts[layer]} units per frame "
                                     f"({total} in the batch), only {candidates} can still merge; keep a larger "
                                     "share or spread the merges over more blocks")
                merge, found = select(scores.reshape(1, -1), total)
                return merge.view_as(scores), found

            new, found = dtome_step(tokens, metric, mode="find", protect_first=False, r=state.merge_counts[layer],
                                    order=order, top=top, size_eps=EXACT_MEAN)
            state.run.found_thresholds.append(float(found))
        elif state.mode == "fixed":  # ToMe: each frame's r best pairs over its segments (the batch path, as "find")
            new, _ = dtome_step(tokens, metric, mode="find", protect_first=False, r=state.merge_counts[layer],
                                order=order, top=self._per_frame_top(state.merge_counts[layer]), size_eps=EXACT_MEAN)
        elif state.mode == "infer":
            threshold = float(state.thresholds[layer]) + state.threshold_offset
            new, _ = dtome_step(tokens, metric, mode="infer", protect_first=False, threshold=threshold, order=order,
                                size_eps=EXACT_MEAN)
        else:
            new = tokens
        state.tokens = new
        state.run.sizes.append(new.sizes)
        state.run.source_maps.append(new.source_map)
        if new is tokens:  # nothing merged or moved
            return hidden
        self.mask = new.mask
        self._layout()
        if self.bias is not None or bool((new.sizes != 1).any()):
            self.bias = torch.log(new.sizes[self.mask]).repeat_interleave(self.unit)
        self.position_embeddings = self.rotary(self._positions(new))
        return self.pack(new.x)

    def _per_frame_top(self, r: int) -> Callable[[Tensor, int], tuple[Tensor, float]]:
        def top(scores: Tensor, _r: int) -> tuple[Tensor, float]:
            merge = torch.zeros_like(scores, dtype=torch.bool)
            for frame in range(self.num_frames):
                rows = (self.frames == frame).nonzero()[:, 0]
                merge[rows] = select_top(scores[rows].reshape(1, -1), r)[0].view(len(rows), -1)
            return merge, 1.0

        return top

    def _positions(self, tokens: TokenState) -> Tensor:
        """[T, 2] RoPE positions of the current tokens: centroids (or the earliest unit's) of what they cover."""
        S, U0 = tokens.source_map.shape
        U = tokens.x.shape[1]
        valid = tokens.source_map >= 0
        target = (tokens.source_map + U * torch.arange(S, device=valid.device)[:, None])[valid]
        if self.state.position_rule == "first":
            first = torch.full((S * U,), U0, dtype=torch.long, device=valid.device)
            first.scatter_reduce_(0, target, torch.arange(U0, device=valid.device).expand(S, U0)[valid], "amin")
            first = first.view(S, U).clamp_max(U0 - 1)
            pos = self.positions0.gather(1, first[..., None].expand(-1, -1, self.positions0.shape[-1]))
        else:
            sums = self.positions0.new_zeros(S * U, self.positions0.shape[-1])
            sums.index_add_(0, target, self.positions0[valid])
            counts = self.positions0.new_zeros(S * U).index_add_(0, target, self.positions0.new_ones(len(target)))
            pos = (sums / counts.clamp_min(1)[:, None]).view(S, U, -1)
        return pos[self.mask].reshape(-1, 2)

    # -- DeepStack and the output
    def keep_for_final_groups(self, hidden: Tensor) -> None:
        """Remember ``hidden`` (a DeepStack layer's output) to be regrouped like the final tokens."""
        self._stash.append((self.pad(hidden), self.state.tokens.source_map))

    def regrouped(self) -> list[Tensor]:
        """The remembered hidden states averaged over the final groups (per original unit, position-wise),
        packed in the final layout."""
        final = self.state.tokens.source_map
        valid = final >= 0
        S, U = self.mask.shape
        target = (final + U * torch.arange(S, device=final.device)[:, None])[valid]
        out = []
        for x, source_map in self._stash:
            per_unit = x.gather(1, source_map.clamp_min(0)[..., None].expand(-1, -1, x.shape[-1]))[valid]
            sums = per_unit.new_zeros(S * U, x.shape[-1]).index_add_(0, target, per_unit)
            counts = per_unit.new_zeros(S * U).index_add_(0, target, per_unit.new_ones(len(target)))
            out.append(self.pack((sums / counts.clamp_min(1)[:, None]).view(S, U, -1)))
        return out

    def split_images(self, features: Tensor, deepstack: list[Tensor]) -> list[MergedImage]:
        """Per image: its merged units (merger outputs), the cell -> token map and the sizes, tokens put in raster
        order of their first cell."""
        tokens = self.state.tokens
        S, U = self.mask.shape
        flat = tokens.source_map + U * torch.arange(S, device=features.device)[:, None]
        slot = torch.full((S * U,), -1, dtype=torch.long, device=features.device)
        slot[self.mask.flatten()] = torch.arange(int(self.mask.sum()), device=features.device)
        cell_token = torch.empty_like(self.cells)
        cell_token[self.cells] = slot[flat[tokens.source_map >= 0]]  # packed unit covering each original cell
        sizes = tokens.sizes[self.mask]
        images, start = [], 0
        for n in self.image_cells:
            covering = cell_token[start:start + n]
            members = torch.unique(covering)  # the image's output units (segments never span images)
            local = torch.searchsorted(members, covering)
            order, source_map = spatial_order(local, len(members))
            keep = members[order]
            images.append(MergedImage(features[keep], source_map, sizes[keep], [d[keep] for d in deepstack]))
            start += n
        return images


# ---------------------------------------------------------------- tower-level helpers for the adapters
def check_call(grid_thw: Tensor, merge_size: int, kwargs: dict) -> None:
    """Refuse what the merged tower cannot give, before any work."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"grid_thw must be [images, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    if bool(((grid_thw[:, 1:] % merge_size) != 0).any()):
        raise ValueError(f"every grid_thw h and w must be a multiple of spatial_merge_size={merge_size}, "
                         f"got {grid_thw.tolist()}")
    asked = [k for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)]
    if asked:
        raise ValueError(f"{', '.join(asked)} is not supported by a DToMe-patched Qwen vision tower "
                         "(token counts change between blocks)")


def checked_call(tower: nn.Module, grid_thw: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
    """:func:`check_call`, then the stock ``(position_ids, cu_seqlens)`` of the call: each token's 2-D RoPE
    position and the frame bounds."""
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    check_call(grid_thw, tower.spatial_merge_size, kwargs)
    return get_vision_position_ids(grid_thw, tower.spatial_merge_size), get_vision_cu_seqlens(grid_thw)


@contextlib.contextmanager
def running(state: QwenDToMeState, units: "UnitPass") -> Iterator["UnitPass"]:
    """Hold ``units`` on the state while the blocks run (they read it there); cleared after, even on an error."""
    state.units = units
    try:
        yield units
    finally:
        state.units = None


def pooled_output(state: QwenDToMeState, hidden_states: Tensor, images: list[MergedImage]):
    """Keep ``images`` on the state; the stock output, ``pooler_output`` their features image by image."""
    # why: transformers' model modules take seconds to import; loaded once a tower is patched
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    state.images = images
    return BaseModelOutputWithPooling(last_hidden_state=hidden_states,
                                      pooler_output=torch.cat([m.features for m in images]))


def image_cells(grid_thw: Tensor, merge_size: int) -> list[int]:
    """Cells of the merged grid per image: t * h * w / merge_size**2."""
    return (grid_thw.prod(-1) // merge_size**2).tolist()


def frames_of(segment_bounds: Tensor, frame_bounds: Tensor) -> Tensor:
    """[S] long: the frame each segment (``segment_bounds``, cumulative) lies in (``frame_bounds``, cumulative)."""
    return torch.searchsorted(frame_bounds[1:].long(), segment_bounds[:-1].long(), right=True)


def patchify(pixels: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[Tensor, Tensor]:
    """Still images ``[B, 3, H, W]`` (already normalised) → the tower's inputs: flat patches in the processor's
    order (``Qwen2VLImageProcessor.patchify``) and ``grid_thw``. Used by threshold finding on an image list."""
    if pixels.dim() != 4:
        raise ValueError(f"pixel values must be [batch, channels, height, width], got shape {tuple(pixels.shape)}")
    B, C, H, W = pixels.shape
    side = patch_size * merge_size
    if H % side or W % side:
        raise ValueError(f"image height and width must be multiples of patch_size*spatial_merge_size={side}, "
                         f"got {H}x{W}")
    gh, gw = H // patch_size, W // patch_size
    x = pixels.reshape(B, C, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
    x = x.expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    flat = x.reshape(B * gh * gw, C * temporal_patch_size * patch_size * patch_size)
    grid = torch.tensor([[1, gh, gw]] * B, device=pixels.device)
    return flat, grid


def keys_of_qkv(heads: int) -> Callable[[Tensor], Tensor]:
    """From ``attn.qkv``'s packed output ``[T, 3*C]`` to the keys by head ``[1, T, H, D]``."""
    return lambda out: out.view(1, out.shape[0], 3, heads, -1)[:, :, 1]


def tower_identity(family: str, config) -> str:
    """e.g. ``qwen2_5_vl-p14-d1280-l32``: these towers take any resolution, so no image size in the name."""
    width = getattr(config, "embed_dim", None) or config.hidden_size
    return f"{family}-p{config.patch_size}-d{width}-l{config.depth}"


def keep_fraction_merge_counts(cells: int, keep: float, num_layers: int, schedule: str = "constant") -> list[int]:
    """Per-layer unit merges per frame that keep ``keep`` (0..1] of ``cells`` merged-grid cells on the finding
    images (the ``-tome-<P>pct`` names of docs/qwen_vl.md)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    counts = merge_schedule(schedule, cells - max(1, round(keep * cells)), num_layers)
    left = cells
    for layer, r in enumerate(counts):  # bipartite matching: at most half of the units merge in a block
        if r > left // 2:
            raise ValueError(f"keeping {keep:.0%} of {cells} cells over {num_layers} blocks ({schedule}) merges {r} "
                             f"of {left} units in block {layer}, more than half: use more blocks or a larger share")
        left -= r
    return counts
