"""DToMe core: dynamic token merging by bipartite matching with thresholds.

Pure torch; knows no model family. An encoder adapter calls :func:`dtome_step`
once per block, after attention + residual and before the MLP, with that block's
keys averaged over heads as ``metric``.

Layout of a batch (padded, left-aligned)
---------------------------------------
Images keep different numbers of tokens, so a batch is a padded tensor
``x [B, N, C]`` whose real tokens come first in every row, in their original
order, followed by padding. ``sizes [B, N]`` counts the original patches a token
stands for and is 0 exactly at padding, so ``mask = sizes > 0``. Because real
tokens are left-aligned and padding never matches, each row is processed exactly
as it would be alone (B>1 equals B=1 per image).

Source map
----------
``source_map [B, N0]`` (long) gives, for every *original* position, the index of
the current token that covers it (-1 for an original position that was padding).
It is O(N0) per image instead of a dense N x N0 matrix.

Token order after a merge
-------------------------
The order decides the next layer's even/odd split, so it is part of the
algorithm. The original DyMU code has two paths (the merge paths; which one a
``token_order`` runs for B=1 and B>1, and each entry point's default, are in
:mod:`dymu.token_order`):

* their *batch path* (``batch_level_bipartite_soft_matching`` +
  ``batch_level_merge_wavg``: finding, and inference of several images): at every
  layer that merges (r > 0, threshold < 1) every image is re-laid as ToMe's
  ``cat([unmerged A, B])`` — the unmerged A tokens, then every B token, each in
  index order (a protected CLS, A token 0, stays first), padding last — even an
  image in which nothing merged. Its average divides by ``size + 1e-4``, not by
  ``size`` (:data:`AUTHORS_BATCH_EPS`, their constant, kept so counts and
  thresholds match theirs): every token of every image, merged or not, CLS
  included, shrinks by that factor at each merging layer. Their padding re-sort is
  an unstable ``argsort`` of the 0/1 padding mask, whose order is the device's (on
  CPU not index order from 129 tokens up); dymu sorts stably (index order), the
  one deterministic reading of it;
* their *single-image path* (``bipartite_soft_matching`` + ToMe's ``merge_wavg``:
  inference of a lone image): only when something merged, the unmerged A tokens
  then B; the A tokens in index order when a token is protected (CLIP), else
  (SigLIP) in descending order of their best score; at most
  ``(n - protected) // 2`` merges; the average divides by ``size`` exactly.

dymu's own *first-patch path* (token order ``"raster"``, dymu 0.1) puts a merged
token at its earliest member's place. The single path, the first-patch path and
the fixed-count ToMe baseline (ToMe's ``merge_wavg``) divide by ``size``. dymu
accumulates the sums in float32 (float64 for float64 inputs) where their code
computes in the input's dtype, so half-precision runs agree with theirs up to
rounding only.

Matching (ToMe's bipartite soft matching, made dynamic)
-------------------------------------------------------
Set A = even indices, set B = odd indices. Every A token finds its most similar B
token (cosine of L2-normalised metric). A protected first token (CLS) is never a
source nor a destination; padded slots never match. Then either

* finding mode: over the whole batch, the ``B * r`` best A tokens merge and the
  layer's threshold is the highest score *not* merged (clamped >= 0); or
* inference mode: per image, every A token whose score is strictly greater than
  the threshold merges; or
* fixed mode (ToMe, the fixed-count baseline): per image, its ``r`` best A tokens
  merge, so every image keeps the same count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.selection import as_float32, descending_rank, select_above, select_top, select_top_per_row  # noqa: F401
from dymu.threads import small_ops
from dymu.token_order import TOKEN_ORDERS, TokenOrder, merge_path, spatial_order  # noqa: F401  (public here too)

Mode = Literal["off", "find", "infer", "fixed"]
# how merge_tokens lays tokens out: "index" = [unmerged A, B] by index, "score" = unmerged A by descending score,
# "first_patch" = each token at its earliest member's place
TokenLayout = Literal["index", "score", "first_patch"]
#: the authors' batch path divides a merged sum by ``size + AUTHORS_BATCH_EPS`` (``batch_level_merge_wavg``)
AUTHORS_BATCH_EPS = 1e-4


@dataclass
class TokenState:
    """Tokens of a (padded) batch together with their merge bookkeeping."""

    x: Tensor  # [B, N, C] hidden states, padding rows are 0
    sizes: Tensor  # [B, N] float, number of original positions per token, 0 at padding
    source_map: Tensor  # [B, N0] long, current token index of each original position, -1 if none

    @classmethod
    def init(cls, x: Tensor, mask: Tensor | None = None) -> "TokenState":
        """Start from unmerged tokens; ``mask [B, N]`` (True = real) must be left-aligned."""
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, tokens, channels], got shape {tuple(x.shape)}")
        B, N, _ = x.shape
        positions = torch.arange(N, device=x.device).expand(B, N)
        if mask is None:
            return cls(x, torch.ones(B, N, device=x.device, dtype=torch.float32), positions.clone())
        _check_mask(mask, (B, N))
        return cls(x, mask.float(), torch.where(mask, positions, -1))

    @property
    def mask(self) -> Tensor:
        """[B, N] bool, True for real tokens."""
        return self.sizes > 0

    @property
    def num_tokens(self) -> Tensor:
        """[B] long, number of real tokens per image."""
        return self.mask.sum(1)

    def unpad(self) -> list[Tensor]:
        """Per-image hidden states without padding, ``[n_b, C]`` each."""
        return [self.x[b, :n] for b, n in enumerate(self.num_tokens.tolist())]


def _check_mask(mask: Tensor, shape: tuple[int, int]) -> None:
    if mask.shape != shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}")
    # left-aligned: once a row has a padded slot, every later slot is padding
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("mask must be left-aligned: real tokens first, padding after them in every row")


def bipartite_scores(
    metric: Tensor, mask: Tensor, protect_first: bool, *, padded: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Best B partner of every A token.

    Returns ``scores [B, Na]`` (cosine similarity, -inf for A tokens that may not
    merge: padded, protected, or with no valid partner) and ``dst [B, Na]``, the
    full-sequence index of each A token's partner. ``padded``: whether ``mask``
    has any padding, if the caller knows (saves a check).
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [batch, tokens, channels], got shape {tuple(metric.shape)}")
    if metric.shape[:2] != mask.shape:
        raise ValueError(
            f"metric has {tuple(metric.shape[:2])} (batch, tokens) but the tokens are {tuple(mask.shape)}"
        )
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    if b.shape[1] == 0:  # a single token: nothing to match
        return torch.full(a.shape[:2], -math.inf, device=metric.device), torch.zeros(a.shape[:2], dtype=torch.long,
                                                                                   device=metric.device)
    if padded is None:  # a full batch (B=1 always) skips every padding mask: fewer small ops
        padded = not bool(mask.all())
    sim = a @ b.transpose(1, 2)
    if padded:
        sim.masked_fill_(~mask[:, None, 1::2], -math.inf)
    scores, dst = sim.max(dim=-1)
    if padded:
        scores.masked_fill_(~mask[:, ::2], -math.inf)
    if protect_first:
        scores[:, 0] = -math.inf
    return scores, dst * 2 + 1


def merge_tokens(
    state: TokenState,
    merge: Tensor,
    dst: Tensor,
    *,
    layout: TokenLayout = "index",
    scores: Tensor | None = None,
    rows: Tensor | None = None,
    padded: bool | None = None,
    size_eps: float = 0.0,
) -> TokenState:
    """Size-weighted average of each merged A token into its B partner.

    ``merge [B, Na]`` flags the A tokens (even indices) that merge; ``dst [B, Na]``
    their partners (odd full indices). Sizes add; the result is re-compacted in
    ``layout`` order: ``"index"`` (unmerged A, then B, each by index), ``"score"``
    (unmerged A by descending ``scores``, then B by index) or ``"first_patch"``
    (each token at its earliest member's place). Padding goes last. ``rows [B]`` (bool):
    only these images are re-laid, the others keep their order. ``padded``: whether
    any slot is padding, if the caller knows (saves a check). ``size_eps``: every
    token's sum is divided by ``size + size_eps`` (the authors' batch path:
    :data:`AUTHORS_BATCH_EPS`; 0 = the exact size-weighted mean).
    """
    x, sizes = state.x, state.sizes
    B, N, C = x.shape
    device = x.device
    mask = sizes > 0
    if padded is None:  # whether any slot is padding (the caller may know)
        padded = not bool(mask.all())
    positions = torch.arange(N, device=device)
    target = positions.repeat(B, 1)  # where each token's content goes: itself, or a merged A token's partner
    target[:, ::2] = torch.where(merge, dst, target[:, ::2])
    kept = mask.clone()
    kept[:, ::2] &= ~merge
    if layout == "first_patch":
        key = torch.full((B, N), N, device=device).scatter_reduce(1, target, positions.expand(B, N), "amin")
    elif layout == "index":
        key = positions + (positions % 2) * N  # A tokens by index, then B tokens by index
    elif layout == "score":
        if scores is None:
            raise ValueError("layout 'score' needs the A tokens' scores")
        key = (N + positions).repeat(B, 1)
        key[:, ::2] = descending_rank(scores)
    else:
        raise ValueError(f"layout must be 'index', 'score' or 'first_patch', got {layout!r}")
    if rows is not None:
        key = torch.where(rows[:, None], key, positions)
    # kept tokens by key; the others (merged away, padding) after them, in any order: no new slot refers to them
    order = torch.where(kept, key, 2 * N).argsort(dim=1, stable=True)
    new_pos = torch.empty_like(order).scatter_(1, order, positions.expand(B, N))
    n_out = int(kept.sum(1).max()) if B else 0
    new_index = new_pos.gather(1, target)
    if padded:
        new_index.masked_fill_(~mask, n_out)  # padding goes to a dump slot
    acc = torch.promote_types(x.dtype, torch.float32)  # accumulate in fp32 even for half precision (fp64 stays)
    weighted = x.to(acc) * sizes.to(acc)[..., None]
    # index_add_ over whole rows of the flattened batch: the same sums, in the same order, as a scatter_add_ along
    # dim 1, several times faster on CPU (one vectorised row add per token instead of per element)
    flat_index = new_index.flatten() if B == 1 else (new_index + (n_out + 1) * torch.arange(B, device=device)[:, None]
                                                     ).flatten()
    total = x.new_zeros(B * (n_out + 1), C, dtype=acc).index_add_(0, flat_index, weighted.flatten(0, 1))
    new_sizes = sizes.new_zeros(B * (n_out + 1)).index_add_(0, flat_index, sizes.flatten()).view(B, n_out + 1)
    new_sizes = new_sizes[:, :n_out]
    # an empty slot (a row shorter than n_out) has total 0 and size 0: 0 / tiny = 0, padding stays 0
    denominator = new_sizes.to(acc) + size_eps if size_eps else new_sizes.to(acc).clamp_min(1e-12)
    new_x = (total.view(B, n_out + 1, C)[:, :n_out] / denominator[..., None]).to(x.dtype)
    sm = state.source_map
    if bool((sm < 0).any()):  # original positions that were padding stay uncovered (-1)
        new_map = torch.where(sm >= 0, new_index.gather(1, sm.clamp_min(0)), -1)
    else:
        new_map = new_index.gather(1, sm)
    return TokenState(new_x, new_sizes, new_map)


def dtome_step(
    state: TokenState,
    metric: Tensor,
    *,
    mode: Mode,
    protect_first: bool,
    threshold: float | Tensor | None = None,
    r: int | None = None,
    order: TokenOrder = "authors",
    top: Callable[[Tensor, int], tuple[Tensor, float]] = select_top,
    size_eps: float | None = None,
) -> tuple[TokenState, float | None]:
    """One DToMe merge for a block.

    ``mode="off"`` returns the state unchanged; ``"find"`` merges the batch's
    ``B*r`` best pairs and returns the found threshold; ``"infer"`` merges every
    pair above ``threshold`` (a float or a per-image ``[B]`` tensor); ``"fixed"``
    merges each image's ``r`` best pairs (ToMe). ``order``:
    the token order after the merge (module doc). ``top``: finding's selection
    (:func:`select_top`; threshold finding over processes passes its own).
    ``size_eps``: the merge divides by ``size + size_eps``; None (default) is the
    path's own, :data:`AUTHORS_BATCH_EPS` on the authors' batch path with thresholds
    or finding, else 0 (an adapter of a tower the authors never merged may want 0).
    """
    if metric.shape[:2] != state.x.shape[:2]:
        raise ValueError(
            f"metric is {tuple(metric.shape)} but the hidden states are {tuple(state.x.shape)}: "
            "batch and token dimensions must agree"
        )
    if mode not in ("off", "find", "infer", "fixed"):
        raise ValueError(f"mode must be 'off', 'find', 'infer' or 'fixed', got {mode!r}")
    path = merge_path(order, mode, state.x.shape[0])
    if mode == "off":
        return state, None
    with small_ops(state.x.device):  # many small ops: threads would only wait for each other (dymu.threads)
        mask = state.mask
        padded = not bool(mask.all())
        scores, dst = bipartite_scores(metric, mask, protect_first, padded=padded)
        if mode in ("find", "fixed"):
            if r is None:
                raise ValueError(f"mode={mode!r} needs r (tokens to merge per image at this layer)")
            merge, found = (top if mode == "find" else select_top_per_row)(scores, r)
            found = found if mode == "find" else None
            active = r > 0
        else:
            if threshold is None:
                raise ValueError("mode='infer' needs a threshold")
            if isinstance(threshold, (int, float)):  # one number: no tensor ops needed to decide
                t: float | Tensor = threshold
                active = as_float32(threshold) < 1.0
            else:
                t = torch.as_tensor(threshold, dtype=scores.dtype, device=scores.device)
                t = t[:, None] if t.dim() == 1 else t
                active = bool((t < 1.0).any())
            # the single-image path merges at most half of the unprotected tokens; with a protected first token an
            # image has at most that many A candidates, so the cap can only bind without one
            cap = (state.num_tokens - int(protect_first)) // 2 if path == "authors_single" and not protect_first else None
            merge, found = select_above(scores, t, cap), None
        if path == "authors_batch":  # every image is re-laid at a merging layer, merged or not
            if not active:
                return state, found
            eps = size_eps if size_eps is not None else AUTHORS_BATCH_EPS if mode != "fixed" else 0.0  # ToMe: exact
            return merge_tokens(state, merge, dst, layout="index", padded=padded, size_eps=eps), found
        if not bool(merge.any()):
            return state, found
        eps = size_eps or 0.0
        if path == "first_patch":
            return merge_tokens(state, merge, dst, layout="first_patch", padded=padded, size_eps=eps), found
        layout: TokenLayout = "index" if protect_first else "score"
        rows = merge.any(1) if merge.shape[0] > 1 else None  # a lone image merged (checked above): re-lay it
        return merge_tokens(state, merge, dst, layout=layout, scores=scores, rows=rows, padded=padded,
                            size_eps=eps), found


def size_bias(sizes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Additive attention bias ``[B, 1, 1, N]`` for proportional attention.

    ``log(size)`` on every key, which also masks padded keys (size 0) with the
    dtype's most negative finite value rather than -inf, so no row is all -inf.
    """
    dtype = dtype or torch.float32
    bias = torch.log(sizes.to(dtype).clamp_min(torch.finfo(dtype).tiny))
    bias = bias.masked_fill(sizes <= 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]
