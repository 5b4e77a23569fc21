"""Run a patched encoder and collect what a VLM needs: :func:`encode` → :class:`Encoding`; token budgets.

Works the same for every adapter (transformers CLIP/SigLIP, open_clip, timm): the patched blocks record the
requested layer's hidden states in the run, so no framework-specific ``output_hidden_states`` is needed, and
the forward stops right after that layer (LLaVA-1.5 reads the second-to-last layer: the last block is skipped).

Layer indices follow transformers' ``hidden_states``: 0 is the input of the first block, ``l`` the output of
block ``l-1``; negative indices count from the end (-1 = last block's output, -2 = second-to-last).

Token budget: thresholds found for "72out" give 72 tokens *on average over the finding data*. To target another
average on your own images, :func:`calibrate_budget` bisects one global offset added to every layer's
threshold (higher offset → fewer merges → more tokens) on a calibration batch and keeps it;
``encode(..., token_budget=K)`` does the same for one call only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dymu.encoders.base import DToMeRun, DToMeState, StopEncoding
from dymu.encoders.patching import get_state
from dymu.token_order import spatial_order


@dataclass
class Encoding:
    """Result of :func:`encode` for a batch of ``B`` images at one layer.

    Per image (padding removed, CLS dropped when ``cls_dropped``):

    * ``features[b]`` — ``[n_b, C]`` hidden states, tokens in the raster order of their first patch (spatial
      order, whatever the token order inside the encoder: what a projector and an LLM without VTU see);
    * ``sizes[b]`` — ``[n_b]`` number of original positions each token covers;
    * ``source_maps[b]`` — ``[P]`` for every original position (patches only when CLS is dropped), the index
      of the feature that covers it — the merge map VTU needs.

    Padded, as the encoder holds them (CLS included, encoder order): ``hidden_states [B, N, C]``, ``mask [B, N]``,
    ``padded_sizes [B, N]``, ``padded_source_map [B, N0]``; and ``tokens_per_layer [L'+1, B]`` (CLS included) for
    the layers that ran. ``run`` is the pass's :class:`~dymu.encoders.base.DToMeRun`: per-layer sizes and source
    maps of every layer that ran, and ``run.hidden_states`` (padded) for ``layer`` and the ``keep_layers`` asked for.
    """

    features: list[Tensor]
    sizes: list[Tensor]
    source_maps: list[Tensor]
    hidden_states: Tensor
    mask: Tensor
    padded_sizes: Tensor
    padded_source_map: Tensor
    tokens_per_layer: Tensor
    layer: int  # resolved hidden-state index, 0..L
    cls_dropped: bool
    threshold_offset: float = 0.0  # the offset in force during this call
    output: Any = None  # the model's own output (e.g. pooled), None when the forward stopped early
    run: DToMeRun | None = None

    @property
    def num_tokens(self) -> list[int]:
        """Features per image (CLS excluded when dropped)."""
        return [f.shape[0] for f in self.features]


@dataclass
class BudgetCalibration:
    """Outcome of :func:`calibrate_budget`."""

    offset: float  # the threshold offset chosen (and set on the model)
    mean_tokens: float  # average tokens per image it gives on the calibration images (CLS excluded)
    target: float
    evaluations: int  # forward passes used


def _state(model: nn.Module) -> DToMeState:
    state = get_state(model)
    if state.forward is None:
        raise ValueError("this patched model has no tower forward recorded; re-patch it with dymu.patch")
    return state


def patch_size(model: nn.Module) -> int | None:
    """Side in px of ``model``'s patches: the kernel of its patch embedding (its first ``Conv2d``); None if it
    has none or a non-square one."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.kernel_size[0] if conv is not None and conv.kernel_size[0] == conv.kernel_size[1] else None


def input_patch_tokens(model: nn.Module, pixel_values: Tensor) -> int:
    """Patch tokens (CLS excluded) each image of ``pixel_values`` enters the patched encoder with: its patch grid,
    not the config's (a DINOv2 takes any input size); the state's count if the patch size is not known."""
    state = get_state(model)
    patch = patch_size(state.forward if isinstance(state.forward, nn.Module) else model)
    if patch is None:
        return state.input_tokens - int(state.protect_first)
    h, w = pixel_values.shape[-2:]
    return (h // patch) * (w // patch)


def _resolve_layer(state: DToMeState, layer: int) -> int:
    total = state.num_layers + 1
    if not -total <= layer < total:
        raise ValueError(f"layer {layer} is out of range for an encoder with {state.num_layers} blocks")
    return layer % total


def _run(
    state: DToMeState, pixel_values: Tensor, layer: int, *, stop_early: bool, record: bool, keep: frozenset[int] = frozenset()
) -> Any:
    """One forward recording ``layer`` and ``keep`` (stopping after the last of them when ``stop_early``);
    returns the model output (None when stopped early)."""
    dtype = next((p.dtype for p in _params(state.forward)), pixel_values.dtype)
    device = next((p.device for p in _params(state.forward)), pixel_values.device)
    last = max({layer} | keep)
    with state.overrides(
        record_layers=(frozenset({layer}) | keep) if record else frozenset(),
        stop_after=last if stop_early and last < state.num_layers else None,
    ):
        try:
            return state.forward(pixel_values.to(device=device, dtype=dtype))
        except StopEncoding:
            return None


Batching = Literal["auto", "padded", "per_image"]


def _pad_to(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim 1 of ``x [1, n, ...]`` to ``length``."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def _run_per_image(
    state: DToMeState, pixel_values: Tensor, layer: int, *, stop_early: bool, keep: frozenset[int]
) -> DToMeRun:
    """Each image through the tower alone (no padding: the cost follows its own token counts), the runs then
    padded into one batch run equal to the padded batch's. Token order ``"authors"`` runs its batch path on a
    batch of several images, which a lone-image call would not: those calls run in ``"batch"`` order
    (:mod:`dymu.token_order`)."""
    order = "batch" if state.token_order == "authors" and len(pixel_values) > 1 else state.token_order
    runs = []
    with state.overrides(token_order=order):
        for x in pixel_values.split(1):
            _run(state, x, layer, stop_early=stop_early, record=True, keep=keep)
            runs.append(state.run)
    depth = min(len(r.sizes) for r in runs)
    combined = DToMeRun(
        sizes=[torch.cat([_pad_to(r.sizes[i], max(q.sizes[i].shape[1] for q in runs)) for r in runs])
               for i in range(depth)],
        source_maps=[torch.cat([r.source_maps[i] for r in runs]) for i in range(depth)],
        found_thresholds=[],
    )
    for i in runs[0].hidden_states:
        n = max(r.hidden_states[i].shape[1] for r in runs)
        combined.hidden_states[i] = torch.cat([_pad_to(r.hidden_states[i], n) for r in runs])
    state.run = combined
    return combined


def _params(module: Any):
    return module.parameters() if isinstance(module, nn.Module) else iter(())


def encode(
    model: nn.Module,
    pixel_values: Tensor,
    *,
    layer: int = -1,
    drop_cls: bool = False,
    keep_layers: tuple[int, ...] | list[int] = (),
    stop_early: bool = True,
    token_budget: float | None = None,
    threshold_offset: float | None = None,
    batching: Batching = "auto",
) -> Encoding:
    """Encode ``pixel_values [B, 3, H, W]`` with the patched encoder in ``model`` and return :class:`Encoding`.

    * ``layer`` — which hidden states (``-2`` for LLaVA-1.5, ``-1`` for LLaVA-OneVision's truncated SigLIP);
    * ``drop_cls`` — drop the protected CLS token from ``features``/``sizes``/``source_maps``;
    * ``keep_layers`` — more hidden-state indices to keep (padded) in ``run.hidden_states``;
    * ``stop_early`` — skip the blocks after ``layer`` (then ``output`` is None);
    * ``token_budget`` — for this call only, calibrate the threshold offset on this batch so that the average
      number of patch tokens at ``layer`` is as close as possible to it;
    * ``threshold_offset`` — for this call only, use this offset instead of the model's;
    * ``batching`` — ``"padded"`` (one forward, images padded to the longest) or ``"per_image"`` (one forward per
      image, no padding: the cost follows each image's kept tokens; same result, ``output`` is None). Per-image
      pays when counts differ a lot (a flat crop next to a busy one; figures in docs/performance.md), but it
      runs the tower's ops once per image: with several threads each op waits for all of them, which on a busy
      machine costs more than the padding saves. ``"auto"`` (default) takes per-image where it changes nothing but time
      and pays: a CPU model on one torch thread, several images, merging by thresholds or fixed counts, and a
      forward that stops before the last block (so there is no model output to lose); else padded.

    Runs under ``torch.no_grad()``.
    """
    if batching not in ("auto", "padded", "per_image"):
        raise ValueError(f"batching must be 'auto', 'padded' or 'per_image', got {batching!r}")
    state = _state(model)
    index = _resolve_layer(state, layer)
    keep = frozenset(_resolve_layer(state, k) for k in keep_layers)
    if batching == "auto":
        device = next((p.device for p in _params(state.forward)), pixel_values.device)
        stops = stop_early and max({index} | keep) < state.num_layers
        per_image = (device.type == "cpu" and torch.get_num_threads() == 1 and len(pixel_values) > 1
                     and state.mode in ("infer", "fixed") and stops)
        batching = "per_image" if per_image else "padded"
    if drop_cls and not state.protect_first:
        raise ValueError(f"{state.encoder} has no CLS token to drop")
    if token_budget is not None and threshold_offset is not None:
        raise ValueError("give token_budget or threshold_offset, not both")
    offset = state.threshold_offset if threshold_offset is None else float(threshold_offset)
    with state.overrides(threshold_offset=offset):  # token_budget / threshold_offset hold for this call only
        if token_budget is not None:
            offset = calibrate_budget(model, pixel_values, token_budget, layer=layer).offset
        with torch.no_grad():
            if batching == "per_image":
                output = None
                _run_per_image(state, pixel_values, index, stop_early=stop_early, keep=keep)
            else:
                output = _run(state, pixel_values, index, stop_early=stop_early, record=True, keep=keep)
    run = state.run
    hidden, sizes, source_map = run.hidden_states[index], run.sizes[index], run.source_maps[index]
    mask = sizes > 0
    start = 1 if drop_cls else 0
    features, token_sizes, maps = [], [], []
    for b, n in enumerate(mask.sum(1).tolist()):
        # CLS is protected: alone at index 0 of both the tokens and the original positions
        order, smap = spatial_order(source_map[b, start:] - start, n - start)
        features.append(hidden[b, start:n][order])
        token_sizes.append(sizes[b, start:n][order])
        maps.append(smap)
    return Encoding(
        features=features,
        sizes=token_sizes,
        source_maps=maps,
        hidden_states=hidden,
        mask=mask,
        padded_sizes=sizes,
        padded_source_map=source_map,
        tokens_per_layer=run.tokens_per_layer(),
        layer=index,
        cls_dropped=drop_cls,
        threshold_offset=offset,
        output=output,
        run=run,
    )


@torch.no_grad()
def mean_tokens(model: nn.Module, pixel_values: Tensor, *, layer: int = -1, batch_size: int | None = None) -> float:
    """Average tokens per image at ``layer`` (CLS excluded) with the model's current thresholds and offset."""
    state = _state(model)
    index = _resolve_layer(state, layer)
    counts = []
    for chunk in pixel_values.split(batch_size or len(pixel_values)):
        _run(state, chunk, index, stop_early=True, record=False)
        counts.append(state.run.num_tokens(index) - int(state.protect_first))
    return float(torch.cat(counts).float().mean())


def calibrate_budget(
    model: nn.Module,
    pixel_values: Tensor,
    target_tokens: float,
    *,
    layer: int = -1,
    batch_size: int | None = None,
    tolerance: float = 0.5,
    max_evaluations: int = 30,
) -> BudgetCalibration:
    """Set the threshold offset so that ``pixel_values`` keep ``target_tokens`` tokens per image on average.

    Tokens are counted at ``layer`` without CLS (as in the authors' "Kout" names). Bisects one global offset
    added to every layer's threshold; token counts are integers, so the offset whose average is closest to the
    target is kept (ties: fewer tokens); the search stops once the average is within ``tolerance`` tokens of the
    target, or after ``max_evaluations`` forward passes. The model must be in inference mode (patched with
    thresholds). Later calls use the offset until it is changed (``dymu.configure(model, threshold_offset=...)``).
    """
    state = _state(model)
    if state.mode != "infer" or state.thresholds is None:
        raise ValueError("calibrate_budget needs a model patched with thresholds (inference mode)")
    index = _resolve_layer(state, layer)
    full = input_patch_tokens(model, pixel_values)
    if not 0 < target_tokens <= full:
        h, w = pixel_values.shape[-2:]
        raise ValueError(
            f"a token budget of {target_tokens:g} is out of range: {state.encoder} makes {full} patch tokens of a "
            f"{h}x{w} px image, so the budget must be in (0, {full}]"
        )
    finite = state.thresholds[torch.isfinite(state.thresholds)]
    t_max = float(finite.max()) if finite.numel() else 0.0
    t_min = float(finite.min()) if finite.numel() else 0.0
    # cosine scores lie in [-1, 1]: below lo every candidate pair merges, above hi none does
    lo, hi = -1.5 - t_max, 1.5 - t_min
    tried: dict[float, float] = {}

    def evaluate(offset: float) -> float:
        with state.overrides(threshold_offset=offset):
            tried[offset] = mean_tokens(model, pixel_values, layer=index, batch_size=batch_size)
        return tried[offset]

    f_lo, f_hi = evaluate(lo), evaluate(hi)
    if f_lo < target_tokens < f_hi:
        while len(tried) < max_evaluations and hi - lo > 1e-6:
            mid = (lo + hi) / 2
            f = evaluate(mid)
            if abs(f - target_tokens) <= tolerance:
                break
            lo, hi = (mid, hi) if f < target_tokens else (lo, mid)
    best = min(tried, key=lambda o: (abs(tried[o] - target_tokens), tried[o], o))
    state.threshold_offset = best
    return BudgetCalibration(best, tried[best], float(target_tokens), len(tried))
