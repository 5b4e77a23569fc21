"""What every DToMe encoder adapter shares: the run state and the patch/unpatch mechanics.

Pattern (ToMe's ``patch/timm.py``, tomesd's ``patch.py``): :func:`dymu.patch`
swaps each transformer block's ``__class__`` for a subclass made by a small
factory in the family's adapter, keeps the original class on the instance
(``_dymu_parent``) and stores one :class:`DToMeState` on the model;
:func:`dymu.unpatch` restores every class and removes every hook it registered.

A patched block calls :meth:`DToMeState.attention_bias` before attention and
:meth:`DToMeState.merge` between attention + residual and the MLP, with that
block's keys (averaged over heads) as the metric, then :meth:`DToMeState.end_layer`.
The encoder wrapper (or the first block) calls :meth:`DToMeState.begin` with the
first block's input, batch first.

Threshold finding over several processes plugs its cross-process selection
(:func:`dymu.finding.select_top_across_processes`) into :attr:`DToMeState.find_selection`:
the state knows only the selection's signature, never the finding module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from dymu.merge import TOKEN_ORDERS, Mode, TokenOrder, TokenState, dtome_step, select_top, size_bias
from dymu.thresholds import check_thresholds


class StopEncoding(Exception):
    """Raised after the last block :func:`dymu.encode` needs (early exit); caught by it."""


@dataclass
class DToMeRun:
    """Bookkeeping of the last forward pass of a patched encoder.

    Index ``l`` of the per-layer lists is the output of block ``l-1`` (index 0 is
    the input of the first block), the same indexing as transformers'
    ``hidden_states`` tuple.
    """

    sizes: list[Tensor] = field(default_factory=list)  # [B, N_l] float, 0 at padding
    source_maps: list[Tensor] = field(default_factory=list)  # [B, N0] long
    found_thresholds: list[float] = field(default_factory=list)  # finding mode: one per block
    hidden_states: dict[int, Tensor] = field(default_factory=dict)  # [B, N_l, C] at the layers asked for

    def mask(self, layer: int = -1) -> Tensor:
        """[B, N_l] bool, True for real tokens of ``layer``'s output."""
        return self.sizes[layer] > 0

    def num_tokens(self, layer: int = -1) -> Tensor:
        """[B] long, tokens kept per image after ``layer``."""
        return self.mask(layer).sum(1)

    def tokens_per_layer(self) -> Tensor:
        """[L+1, B] long: tokens per image at the input and after each block."""
        return torch.stack([s.gt(0).sum(1) for s in self.sizes])


@dataclass
class DToMeState:
    """Settings of a patched encoder plus the state of the forward pass in flight.

    ``mode`` is ``"infer"`` (merge above ``thresholds``), ``"find"`` (merge the
    batch's top ``merge_counts[l]`` per image and record thresholds), ``"fixed"``
    (ToMe: every image merges exactly ``merge_counts[l]``) or ``"off"``.
    """

    num_layers: int
    protect_first: bool
    encoder: str
    input_tokens: int = 0  # tokens per image entering the first block (CLS included)
    forward: Callable[[Tensor], object] | None = None  # runs the patched tower on pixel values
    mode: Mode = "off"
    thresholds: Tensor | None = None  # [L] float32
    merge_counts: list[int] | None = None
    threshold_offset: float = 0.0  # added to every threshold: > 0 keeps more tokens, < 0 fewer
    threshold_grid: tuple[int, str] | None = None  # (patch tokens, in words) the thresholds were found for, if known
    token_order: TokenOrder = "authors"  # token order after a merge (dymu.merge module doc)
    # finding mode's per-layer selection (scores, r) -> (merge flags, threshold): one batch's top-k by default;
    # dymu.finding plugs in its selection across torch.distributed processes
    find_selection: Callable[[Tensor, int], tuple[Tensor, float]] = select_top
    record_layers: frozenset[int] = frozenset()  # hidden-state indices (0..L) to keep in run.hidden_states
    stop_after: int | None = None  # raise StopEncoding once hidden-state index stop_after is recorded
    tokens: TokenState | None = None
    run: DToMeRun = field(default_factory=DToMeRun)
    hooks: list = field(default_factory=list)
    _keys: Tensor | None = None
    _merged: bool = False  # any merge or padding so far in this pass (else attention needs no bias)
    _threshold_values: tuple[Tensor, list[float]] | None = None  # (thresholds, as Python floats: no tensor op)
    _bias: tuple[Tensor, torch.dtype, Tensor] | None = None  # (sizes, dtype, bias): reused until the sizes change

    def configure(
        self,
        *,
        thresholds: Tensor | None = None,
        merge_counts: list[int] | None = None,
        mode: Mode | None = None,
        token_order: TokenOrder | None = None,
    ) -> None:
        if token_order is not None:
            if token_order not in TOKEN_ORDERS:
                raise ValueError(f"token_order must be one of {', '.join(TOKEN_ORDERS)}, got {token_order!r}")
            self.token_order = token_order
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
            if thresholds.numel() != self.num_layers:
                raise ValueError(
                    f"{thresholds.numel()} thresholds given but the encoder has {self.num_layers} blocks"
                )
            self.thresholds = check_thresholds(thresholds)
        if merge_counts is not None:
            if len(merge_counts) != self.num_layers:
                raise ValueError(f"{len(merge_counts)} merge counts for an encoder of {self.num_layers} blocks")
            self.merge_counts = list(merge_counts)
        if mode is None:
            mode = "find" if merge_counts is not None else "infer" if self.thresholds is not None else self.mode
        if mode == "infer" and self.thresholds is None:
            raise ValueError("mode 'infer' needs thresholds")
        if mode in ("find", "fixed") and self.merge_counts is None:
            raise ValueError(f"mode {mode!r} needs merge_counts (e.g. from dymu.merge_schedule)")
        self.mode = mode

    # -- called by the patched modules, in this order, during a forward pass
    def begin(self, x: Tensor, mask: Tensor | None = None) -> None:
        if self.mode == "infer" and self.threshold_grid is not None:
            # DINOv2 takes any input size and its identity does not say which: thresholds fit one token grid only
            tokens, grid = self.threshold_grid
            if x.shape[1] - int(self.protect_first) != tokens:
                raise ValueError(
                    f"the thresholds of {self.encoder!r} were found on {grid} inputs ({tokens} patch tokens), but "
                    f"this input has {x.shape[1] - int(self.protect_first)} patch tokens: resize the images to the "
                    "checkpoint's size or use thresholds found at this size"
                )
        self.tokens = TokenState.init(x, mask)
        self._merged = mask is not None and not bool(mask.all())
        self._bias = None
        self.run = DToMeRun(sizes=[self.tokens.sizes], source_maps=[self.tokens.source_map])
        self._record(0, x)

    def attention_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Proportional-attention bias ``[B, 1, 1, N]`` (log size, padding masked), or None before any merge."""
        if self.tokens is None:
            raise RuntimeError("a DyMU block ran outside a patched encoder's forward (begin() was not called)")
        if not self._merged:
            return None
        sizes = self.tokens.sizes
        if self._bias is None or self._bias[0] is not sizes or self._bias[1] != dtype:  # blocks that merged nothing
            self._bias = (sizes, dtype, size_bias(sizes, dtype))                        # share their bias
        return self._bias[2]

    def merge(self, layer: int, x: Tensor, metric: Tensor) -> Tensor:
        """Merge ``x`` (block's attention + residual) by ``metric`` and return the merged hidden states."""
        assert self.tokens is not None
        tokens = TokenState(x, self.tokens.sizes, self.tokens.source_map)
        if self.mode == "find":
            tokens, found = dtome_step(
                tokens, metric, mode="find", protect_first=self.protect_first, r=self.merge_counts[layer],
                order=self.token_order, top=self.find_selection,
            )
            self.run.found_thresholds.append(float(found))
        elif self.mode == "fixed":
            tokens, _ = dtome_step(
                tokens, metric, mode="fixed", protect_first=self.protect_first, r=self.merge_counts[layer],
                order=self.token_order,
            )
        elif self.mode == "infer":
            if self._threshold_values is None or self._threshold_values[0] is not self.thresholds:
                self._threshold_values = (self.thresholds, self.thresholds.tolist())
            threshold = self._threshold_values[1][layer] + self.threshold_offset
            tokens, _ = dtome_step(
                tokens, metric, mode="infer", protect_first=self.protect_first, threshold=threshold,
                order=self.token_order,
            )
        # a re-layout without merges (batch path) needs no bias either: only sizes != 1 (merges, padding) do
        self._merged = self._merged or (tokens.sizes is not self.tokens.sizes and bool((tokens.sizes != 1).any()))
        self.tokens = tokens
        return tokens.x

    def end_layer(self, x: Tensor) -> Tensor:
        """Record the block output; padding rows are zeroed so they never leak into later blocks."""
        assert self.tokens is not None
        if self._merged and not bool(self.tokens.mask.all()):  # only a batch with padding has rows to zero
            x = x * self.tokens.mask[..., None].to(x.dtype)
        self.tokens = TokenState(x, self.tokens.sizes, self.tokens.source_map)
        self.run.sizes.append(self.tokens.sizes)
        self.run.source_maps.append(self.tokens.source_map)
        self._record(len(self.run.sizes) - 1, x)
        return x

    def _record(self, index: int, x: Tensor) -> None:
        if index in self.record_layers:
            self.run.hidden_states[index] = x
        if self.stop_after is not None and index >= self.stop_after:
            raise StopEncoding(index)

    @contextlib.contextmanager
    def overrides(self, **fields) -> Iterator["DToMeState"]:
        """Set some fields (``threshold_offset``, ``record_layers`` …) for the calls inside the block only."""
        unknown = [name for name in fields if name not in self.__dataclass_fields__]
        if unknown:
            raise AttributeError(f"DToMeState has no field {', '.join(unknown)}")
        saved = {name: getattr(self, name) for name in fields}
        for name, value in fields.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # -- hooks
    def capture_keys(self, module: nn.Module, heads: int | Callable[[Tensor], Tensor]) -> None:
        """Record the keys computed by ``module``, averaged over heads, as the next merge's metric.

        ``heads``: the number of heads when ``module`` is the key projection (output ``[B, N, H*D]``), or a
        function from ``module``'s output to the keys split by head, ``[B, N, H, D]`` (e.g. a fused qkv).
        """

        def split(output: Tensor) -> Tensor:
            return output.view(*output.shape[:2], heads, -1)

        keys_of = split if isinstance(heads, int) else heads

        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            self._keys = keys_of(output).mean(2)

        self.hooks.append(module.register_forward_hook(hook))

    def take_keys(self) -> Tensor:
        keys, self._keys = self._keys, None
        if keys is None:
            raise RuntimeError("the block's key projection did not run: cannot compute the merge metric")
        return keys


# ---------------------------------------------------------------- class swapping
def swap_class(module: nn.Module, factory: Callable[[type], type], state: DToMeState, **attrs) -> None:
    """Give ``module`` a DyMU subclass of its class; remember the original for :func:`restore_class`."""
    if hasattr(module, "_dymu_parent"):
        raise ValueError(f"{type(module).__name__} is already patched by dymu; call dymu.unpatch first")
    parent = module.__class__
    module.__class__ = _subclass(factory, parent)
    module._dymu_parent = parent
    module._dymu_dtome_state = state  # the tower's DToMeState (a VLM keeps its own state under _dymu_vlm)
    for name, value in attrs.items():
        setattr(module, f"_dymu_{name}", value)


def restore_class(module: nn.Module) -> None:
    parent = module.__dict__.pop("_dymu_parent", None)
    if parent is None:
        return
    module.__class__ = parent
    for name in [n for n in module.__dict__ if n.startswith("_dymu")]:
        del module.__dict__[name]


_SUBCLASSES: dict[tuple[Callable, type], type] = {}


def _subclass(factory: Callable[[type], type], parent: type) -> type:
    # one subclass per (factory, parent): isinstance checks and pickling stay stable across patches
    key = (factory, parent)
    if key not in _SUBCLASSES:
        cls = factory(parent)
        cls.__name__ = cls.__qualname__ = f"DToMe{parent.__name__}"  # e.g. DToMeCLIPEncoderLayer
        _SUBCLASSES[key] = cls
    return _SUBCLASSES[key]


def first_instance(model: nn.Module, classes: type | tuple[type, ...]) -> nn.Module | None:
    """The first module of ``classes`` inside ``model`` (itself included), or None."""
    return next((m for m in model.modules() if isinstance(m, classes)), None)


def require_bias_attention(config, what: str) -> None:
    """DToMe adds a per-key bias to attention: only transformers' sdpa and eager kernels take one."""
    if config._attn_implementation not in ("sdpa", "eager", None):
        raise ValueError(
            f"DToMe needs an attention implementation that takes an additive bias ('sdpa' or 'eager'); "
            f"{what} uses {config._attn_implementation!r}"
        )


def size_weighted_mean(x: Tensor, sizes: Tensor) -> Tensor:
    """``[B, N, C]`` → ``[B, C]``: the mean over original positions (padding has size 0)."""
    w = sizes[..., None].to(x.dtype)
    return (x * w).sum(1) / w.sum(1)


def patched_modules(model: nn.Module) -> Iterable[nn.Module]:
    return (m for m in model.modules() if "_dymu_parent" in m.__dict__)
