"""Token orders and merge paths: the one vocabulary, and which path each order runs.

The token order after a merge decides the next layer's even/odd A/B split, so it is part of the algorithm
(:mod:`dymu.merge`). Two words, two things:

* a **token order** (``token_order=``, ``--token-order``, recorded in threshold checkpoints) is the user's choice:
  ``"authors"``, ``"batch"``, ``"single"`` or ``"raster"``;
* a **merge path** (:data:`MergePath`, internal) is what one :func:`dymu.merge.dtome_step` runs:
  ``"authors_batch"`` (the authors' ``batch_level_merge_wavg``: every image re-laid ``[unmerged A, B]`` at each
  merging layer, divided by ``size + 1e-4``), ``"authors_single"`` (their single-image path, ToMe's
  ``merge_wavg``: re-laid only when it merged, A by score without a CLS, divided by ``size``) or ``"first_patch"``
  (dymu 0.1: a merged token takes its earliest patch's place).

=================  ====================  ====================  ===================  ================
token order        inference, B = 1      inference, B > 1      finding / fixed      batch-invariant
=================  ====================  ====================  ===================  ================
``"authors"``      ``authors_single``    ``authors_batch``     ``authors_batch``    no (as theirs)
``"batch"``        ``authors_batch``     ``authors_batch``     ``authors_batch``    yes
``"single"``       ``authors_single``    ``authors_single``    ``authors_batch``    yes
``"raster"``       ``first_patch``       ``first_patch``       ``first_patch``      yes
=================  ====================  ====================  ===================  ================

Thresholds found in ``authors``, ``batch`` and ``single`` order are identical (finding always runs the batch
path); ``raster`` finds other ones.

Default token order per entry point, and why:

* :func:`dymu.patch` / :func:`dymu.configure`: the threshold checkpoint's recorded order (``authors`` for the
  authors' files), else ``"authors"`` — exactly the original code, so counts match theirs;
* ``dymu thresholds`` (finding): ``"authors"``, recorded in the checkpoint;
* ``dymu encode``: the checkpoint's;
* LLaVA-1.5 :func:`dymu.vlm.enable_dymu` / ``dymu.vlm.load``: the checkpoint's;
* LLaVA-OneVision (library and lmms-eval backend): ``"batch"`` — the authors' OneVision code merges the crops of
  a call as one batch;
* ``dymu eval``, the lmms-eval LLaVA backend and ``dymu demo``: ``"single"`` — each image merged as the authors'
  code merges a lone image, whatever else shares its batch, so a score does not depend on the batch size and a
  resumed run equals an uninterrupted one;
* the Qwen-VL towers: ``"batch"`` — the authors never merged them; one path for every batch;
* ``dymu generate`` and :func:`dymu.vlm.load`: the family's default above;
* :func:`dymu.encode` with ``batching="per_image"``: ``"authors"`` runs as ``"batch"`` for a batch of several
  images, because the padded call it stands in for takes the batch path there (a lone-image call would take the
  single path and give other counts).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

TokenOrder = Literal["authors", "batch", "single", "raster"]
TOKEN_ORDERS: tuple[str, ...] = ("authors", "batch", "single", "raster")
MergePath = Literal["authors_batch", "authors_single", "first_patch"]


def merge_path(order: TokenOrder, mode: str, batch: int) -> MergePath:
    """The merge path (module table) a step of ``mode`` on ``batch`` images runs under token ``order``."""
    if order not in TOKEN_ORDERS:
        raise ValueError(f"token order must be one of {', '.join(TOKEN_ORDERS)}, got {order!r}")
    if order == "raster":
        return "first_patch"
    if mode in ("find", "fixed"):  # every image merges: the batch path, as ToMe's merge_wavg lays it out
        return "authors_batch"
    if order == "authors":
        return "authors_single" if batch == 1 else "authors_batch"
    return "authors_batch" if order == "batch" else "authors_single"


def spatial_order(source_map: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Put one image's tokens in the raster order of their first original position (what a projector and an LLM
    without VTU read, whatever the token order inside the encoder).

    ``source_map [N0]`` maps original positions to token indices (-1: none). Returns
    ``order [num_tokens]`` (``tokens[order]`` is the spatial order) and the source
    map of the reordered tokens.
    """
    positions = torch.arange(source_map.shape[0], device=source_map.device)
    covered = source_map >= 0
    first = torch.full((num_tokens,), source_map.shape[0], dtype=torch.long, device=source_map.device)
    first.scatter_reduce_(0, source_map[covered], positions[covered], "amin")
    order = first.argsort()
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(num_tokens, device=order.device))
    return order, torch.where(covered, inverse[source_map.clamp_min(0)], -1)
