"""VTU in transformers: which kernel runs, the registered attention functions, the per-call state, ``enable_vtu``
and shorthands.

Importing this module registers two attention functions with ``transformers.AttentionInterface``
(:data:`ATTN_IMPLEMENTATIONS`: ``dymu_vtu_fast``, ``dymu_vtu_exact``) and, under the same names, a mask builder
with ``AttentionMaskInterface``. :func:`enable_vtu` selects one on a model's text decoder. Each call runs the kernel
that :data:`DISPATCH` names for its mode, phase (prefill or decode) and device/dtype; :func:`vtu_kernels` overrides
it. Per-call state (a :class:`~dymu.vtu.batch.VTUBatch`) travels in :func:`vtu_context` (a ``ContextVar``, since
``generate`` rejects unknown kwargs) or in a ``vtu_batch=`` forward kwarg; outside both, the registered function
*is* stock sdpa (same mask, same call), so an enabled model is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, get_args

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dymu.vtu.batch import VTUBatch
from dymu.vtu.decoders import find_decoder
from dymu.vtu.exact import vtu_attention_exact
from dymu.vtu.fast_blocked_cpu import vtu_attention_fast_blocked
from dymu.vtu.fast_sdpa import vtu_attention_fast_sdpa
from dymu.vtu.ops import VTUKernel
from dymu.vtu.positions import RopeSource, check_call_positions, check_rope_kind

__all__ = [
    "VTUMode",
    "VTU_MODES",
    "ATTN_IMPLEMENTATIONS",
    "Phase",
    "KernelName",
    "KERNELS",
    "DISPATCH",
    "select_kernel",
    "vtu_kernels",
    "check_vtu_mode",
    "vtu_context",
    "current_vtu_batch",
    "enable_vtu",
    "disable_vtu",
    "vtu_mode",
    "vtu_forward",
    "vtu_generate",
]

#: What a model's decoder runs: VTU ``"fast"`` or ``"exact"``, or ``"off"`` (stock attention).
VTUMode = Literal["fast", "exact", "off"]
VTU_MODES: tuple[VTUMode, ...] = get_args(VTUMode)

#: Names under which the VTU attention functions are registered with transformers.
ATTN_IMPLEMENTATIONS: dict[str, str] = {"fast": "dymu_vtu_fast", "exact": "dymu_vtu_exact"}


def check_vtu_mode(mode: Any, name: str = "vtu mode") -> VTUMode:
    """``mode`` if it is one of :data:`VTU_MODES`, else a ``ValueError`` naming ``name`` and the choices."""
    if mode not in VTU_MODES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, VTU_MODES))}; got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------------
# Which kernel runs: ONE table (docs/vtu.md, "Which kernel runs")
# --------------------------------------------------------------------------------------------------

#: What an attention call computes: the merged prompt, or new tokens on the cache.
Phase = Literal["prefill", "decode"]
#: The kernels, one algorithm each; all give the same numbers up to float rounding and differ in cost.
KernelName = Literal["fast_sdpa", "fast_blocked_cpu", "exact"]
KERNELS: dict[KernelName, VTUKernel] = {
    "fast_sdpa": vtu_attention_fast_sdpa,  # expand q/k/v to virtual length, SDPA, group mean
    "fast_blocked_cpu": vtu_attention_fast_blocked,  # the same scores in causal row blocks, V on merged pairs
    "exact": vtu_attention_exact,  # the RoPE decomposition on merged pairs, nothing expanded
}

#: The conditions of :data:`DISPATCH` on a call's (device type, dtype, dropout probability).
WHERE: dict[str, Callable[[str, torch.dtype, float], bool]] = {
    "cpu fp32/fp64, no dropout": lambda device, dtype, dropout: (
        device == "cpu" and dtype in (torch.float32, torch.float64) and not dropout),
    "any": lambda device, dtype, dropout: True,
}

#: (mode, phase, where) -> kernel: the first row that matches a call runs it.
DISPATCH: tuple[tuple[VTUMode, Phase, str, KernelName], ...] = (
    # mode     phase      where                         kernel
    ("fast",  "prefill", "cpu fp32/fp64, no dropout", "fast_blocked_cpu"),  # CPU SDPA: whole square, V per row
    ("fast",  "prefill", "any",                       "fast_sdpa"),  # GPU flash SDPA skips masked blocks itself
    ("fast",  "decode",  "any",                       "exact"),  # one query row: nothing copied to virtual length
    ("exact", "prefill", "any",                       "exact"),
    ("exact", "decode",  "any",                       "exact"),
)

_FORCED: contextvars.ContextVar[dict[Phase, KernelName]] = contextvars.ContextVar("dymu_vtu_kernels", default={})


@contextlib.contextmanager
def vtu_kernels(prefill: KernelName | None = None, decode: KernelName | None = None) -> Iterator[None]:
    """Run the named kernel for that phase inside the block, in every VTU mode and on every device, instead of
    :data:`DISPATCH`'s choice (None: the table's). For tests and benchmarks that compare the kernels; the numbers
    are the same up to float rounding. ``fast_blocked_cpu`` computes with SDPA where it has nothing to block (a
    decode step, nothing merged, dropout).
    """
    forced = dict(_FORCED.get())
    for phase, name in (("prefill", prefill), ("decode", decode)):
        if name is not None:
            if name not in KERNELS:
                raise ValueError(f"vtu_kernels: {phase} must be one of {', '.join(map(repr, KERNELS))}; got {name!r}")
            forced[phase] = name
    token = _FORCED.set(forced)
    try:
        yield
    finally:
        _FORCED.reset(token)


def select_kernel(mode: VTUMode, phase: Phase, device: str, dtype: torch.dtype, dropout: float = 0.0) -> KernelName:
    """The kernel a VTU call runs: a :func:`vtu_kernels` override, else the first matching row of :data:`DISPATCH`.

    ``device``: the device type of the query (``"cpu"``, ``"cuda"``, ...).
    """
    forced = _FORCED.get().get(phase)
    if forced is not None:
        return forced
    for row_mode, row_phase, where, kernel in DISPATCH:
        if row_mode == mode and row_phase == phase and WHERE[where](device, dtype, dropout):
            return kernel
    raise ValueError(f"no VTU kernel for mode {mode!r}, phase {phase!r}; expected a mode in {VTU_MODES[:2]} and "
                     "phase 'prefill' or 'decode'")


# --------------------------------------------------------------------------------------------------
# Per-call state
# --------------------------------------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[VTUBatch | None] = contextvars.ContextVar("dymu_vtu_batch", default=None)


@contextlib.contextmanager
def vtu_context(batch: VTUBatch | None) -> Iterator[VTUBatch | None]:
    """Make ``batch`` the VTU state of every VTU-enabled model call inside the block.

    ``None`` switches VTU off inside the block (the registered attention then is stock sdpa).
    """
    if batch is not None and not isinstance(batch, VTUBatch):
        raise TypeError(f"vtu_context expects a VTUBatch (from prepare_vtu), got {type(batch).__name__}")
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)


def current_vtu_batch() -> VTUBatch | None:
    """The batch set by the innermost :func:`vtu_context`, if any."""
    return _CURRENT.get()


# --------------------------------------------------------------------------------------------------
# The registered attention functions
# --------------------------------------------------------------------------------------------------


_ROPE_ATTR = "_dymu_vtu_rope"
_HANDLE_ATTR = "_dymu_vtu"
#: Name of the profiler range around each VTU attention call (``torch.profiler``): the ops inside it are VTU's.
PROFILER_LABEL = "dymu::vtu_attention"


def _attention_function(mode: VTUMode) -> Callable[..., tuple[Tensor, None]]:
    """The attention function registered for ``mode`` (transformers' attention-function contract)."""

    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        batch = kwargs.pop("vtu_batch", None)
        if batch is None:
            batch = _CURRENT.get()
        if batch is None:  # no VTU state: exactly stock sdpa
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        rope = getattr(module, _ROPE_ATTR, None)
        if rope is None:
            raise ValueError(
                f"VTU attention was selected on {type(module).__name__} without dymu.vtu.enable_vtu(model, ...); "
                "enable it through enable_vtu so the decoder's RoPE frequencies are known"
            )
        if kwargs.get("sliding_window") is not None:
            raise ValueError(f"VTU does not support sliding-window attention (sliding_window={kwargs['sliding_window']})")
        check_rope_kind(rope, batch)
        lay = batch.layout(query, key)
        if getattr(module, "layer_idx", 0) == 0:  # one check per forward is enough
            check_call_positions(rope, kwargs, lay)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        phase: Phase = "decode" if lay.identity_q else "prefill"  # decode: the new tokens are groups of one
        kernel = KERNELS[select_kernel(mode, phase, query.device.type, query.dtype, dropout)]
        with torch.profiler.record_function(PROFILER_LABEL):  # so profiles can tell its ops from the model's
            return kernel(query, key, value, lay, rope.inv_freq, scaling, dropout), None

    attention.__name__ = attention.__qualname__ = ATTN_IMPLEMENTATIONS[mode]
    return attention


def _vtu_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """Mask builder registered under the VTU names: the stock sdpa mask (merged layout).

    Outside a VTU context the attention function is stock sdpa and needs exactly this mask; inside one
    it builds its own mask at virtual length, so creating the merged one is skipped.
    """
    if _CURRENT.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


for _mode, _name in ATTN_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _attention_function(_mode))
    AttentionMaskInterface.register(_name, _vtu_mask)


# --------------------------------------------------------------------------------------------------
# Switching a model
# --------------------------------------------------------------------------------------------------


@dataclass
class _Handle:
    mode: str
    previous: str
    config_key: str | None


def _set_impl(model: nn.Module, config_key: str | None, name: str) -> None:
    model.set_attn_implementation(name if config_key is None else {config_key: name})


def enable_vtu(model: nn.Module, mode: VTUMode = "fast") -> nn.Module:
    """Switch the text decoder of ``model`` to VTU attention (``"off"`` = :func:`disable_vtu`).

    Works on a ``*ForCausalLM``, a bare decoder model, or a VLM whose text model is Llama, Qwen2 or
    Mistral, or (M-RoPE) Qwen2-VL / Qwen2.5-VL / Qwen3-VL; for a VLM only the text sub-config is switched,
    so the vision tower keeps its attention. On an M-RoPE decoder a forward pre-hook on its rotary embedding
    records the position ids it is given (to check them against the batch); :func:`disable_vtu` removes it.
    Nothing changes until a :class:`VTUBatch` is supplied (by :func:`vtu_context` or ``vtu_batch=``).

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: unknown mode, or a model VTU does not support (see :mod:`dymu.vtu.decoders`).
    """
    if check_vtu_mode(mode) == "off":
        return disable_vtu(model)
    info = find_decoder(model)
    handle = getattr(model, _HANDLE_ATTR, None)
    previous = handle.previous if handle is not None else info.config._attn_implementation
    name = ATTN_IMPLEMENTATIONS[mode]
    _set_impl(model, info.config_key, name)
    if info.config._attn_implementation != name:
        raise ValueError(
            f"VTU: {type(model).__name__} did not accept attn_implementation {name!r} "
            f"(it stays {info.config._attn_implementation!r}); the model must support transformers' AttentionInterface"
        )
    source = RopeSource(info.rotary)
    for attn in info.attentions:
        old = attn.__dict__.get(_ROPE_ATTR)
        if old is not None and old.hook is not None:  # enabled again (another mode): one recording hook
            old.hook.remove()
        setattr(attn, _ROPE_ATTR, source)
    setattr(model, _HANDLE_ATTR, _Handle(mode, previous or "sdpa", info.config_key))
    return model


def disable_vtu(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_vtu`: restore the previous attention implementation; no-op if not enabled."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        return model
    _set_impl(model, handle.config_key, handle.previous)
    for module in model.modules():
        if _ROPE_ATTR in module.__dict__:
            source = module.__dict__[_ROPE_ATTR]
            if source.hook is not None:
                source.hook.remove()  # one source is shared by all layers; removing twice is harmless
            delattr(module, _ROPE_ATTR)
    delattr(model, _HANDLE_ATTR)
    return model


def vtu_mode(model: nn.Module) -> VTUMode:
    """``"fast"``, ``"exact"`` or ``"off"`` for ``model``."""
    handle = getattr(model, _HANDLE_ATTR, None)
    return "off" if handle is None else handle.mode  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Shorthands
# --------------------------------------------------------------------------------------------------


def _model_inputs(batch: VTUBatch, kwargs: dict[str, Any]) -> dict[str, Any]:
    for name in ("attention_mask", "position_ids"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} comes from the VTU batch; do not pass it")
    inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        inputs = kwargs.get("input_ids")
    device = inputs.device if isinstance(inputs, Tensor) else batch.device
    kwargs["attention_mask"] = batch.attention_mask.to(device)
    kwargs["position_ids"] = batch.model_position_ids.to(device)
    return kwargs


def vtu_forward(model: nn.Module, batch: VTUBatch, **kwargs: Any) -> Any:
    """``model(**kwargs)`` with the batch's attention mask and position ids (:attr:`VTUBatch.model_position_ids`),
    inside :func:`vtu_context`.

    Pass merged ``inputs_embeds``/``input_ids`` already padded with :meth:`VTUBatch.pad`.
    """
    with vtu_context(batch):
        return model(**_model_inputs(batch, kwargs))


def vtu_generate(model: nn.Module, batch: VTUBatch, **kwargs: Any) -> Any:
    """``model.generate(**kwargs)`` with the batch's attention mask and position ids, inside :func:`vtu_context`."""
    with vtu_context(batch):
        return model.generate(**_model_inputs(batch, kwargs))
