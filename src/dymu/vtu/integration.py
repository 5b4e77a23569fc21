"""VTU in transformers: the registered attention functions, the per-call state, ``enable_vtu`` and shorthands.

Importing this module registers two attention functions with ``transformers.AttentionInterface``
(:data:`ATTN_IMPLEMENTATIONS`: ``dymu_vtu_fast``, ``dymu_vtu_exact``) and, under the same names, a mask builder
with ``AttentionMaskInterface``. :func:`enable_vtu` selects one on a model's text decoder. Per-call state (a
:class:`~dymu.vtu.layout.VTUBatch`) travels in :func:`vtu_context` (a ``ContextVar``, since ``generate``
rejects unknown kwargs) or in a ``vtu_batch=`` forward kwarg; outside both, the registered function *is*
stock sdpa (same mask, same call), so an enabled model is unchanged.
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

from dymu.vtu.decoders import find_decoder
from dymu.vtu.kernels import KERNELS
from dymu.vtu.layout import Layout, VTUBatch
from dymu.vtu.mrope import MROPE_COMPONENTS, frequency_matrix, is_mrope, mrope_components

__all__ = [
    "VTUMode",
    "VTU_MODES",
    "ATTN_IMPLEMENTATIONS",
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


class _RopeSource:
    """Plain holder of a decoder's rotary embedding, stored on its attention modules.

    Not an ``nn.Module``, so it is not registered as a sub-module (state dict and ``modules()`` stay
    stock); ``inv_freq`` is read at call time so ``model.to(...)`` and dynamic RoPE are followed.
    M-RoPE (:mod:`dymu.vtu.mrope`): ``inv_freq`` is the ``[3, F]`` frequency matrix (built once per ``inv_freq``
    tensor, so the kernels' per-call tables stay cached), and ``positions`` the M-RoPE position ids the rotary
    embedding last received (recorded by a forward pre-hook, since attention functions never see them).
    """

    __slots__ = ("rotary", "components", "positions", "hook", "_matrix")

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.components = mrope_components(rotary) if is_mrope(rotary) else None
        self.positions: Tensor | None = None
        self.hook = None
        self._matrix: tuple[tuple, Tensor] | None = None
        if self.components is not None:
            self.hook = rotary.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.positions = args[1] if len(args) > 1 else kwargs.get("position_ids")

    @property
    def inv_freq(self) -> Tensor:
        inv_freq = self.rotary.inv_freq
        if self.components is None:
            return inv_freq
        key = (inv_freq.data_ptr(), inv_freq._version, inv_freq.device)
        if self._matrix is None or self._matrix[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: the kernels key tables by _version
                self._matrix = (key, frequency_matrix(inv_freq, self.components))
        return self._matrix[1]


_ROPE_ATTR = "_dymu_vtu_rope"
#: Decode steps of the "fast" mode use the exact kernel (equal up to float rounding, cheaper per step); set False
#: to decode with the fast kernel (bench/vtu_prefill.py compares both).
DECODE_WITH_EXACT = True
_HANDLE_ATTR = "_dymu_vtu"
#: Name of the profiler range around each VTU attention call (``torch.profiler``): the ops inside it are VTU's.
PROFILER_LABEL = "dymu::vtu_attention"


def _check_rope_kind(rope: _RopeSource, batch: VTUBatch) -> None:
    """Refuse a batch whose positions do not fit the decoder's RoPE (1-D vs M-RoPE and its components)."""
    comps = None if batch.slot_rope_positions is None else batch.slot_rope_positions.shape[-1]
    if rope.components is None and comps is not None:
        raise ValueError("VTU: the batch has M-RoPE positions (prepare_vtu(positions=...)), but this decoder uses "
                         "1-D RoPE; build the batch without positions")
    if rope.components is not None and comps is None:
        raise ValueError("VTU: this decoder uses M-RoPE; give prepare_vtu the (3, N) position ids of every virtual "
                         "position (positions=[...], e.g. get_rope_index on the unmerged sequence)")
    if rope.components is not None and comps != MROPE_COMPONENTS:
        raise ValueError(f"VTU: this decoder's M-RoPE has {MROPE_COMPONENTS} position components (t, h, w); the "
                         f"batch's positions have {comps} rows")


def _check_mrope_positions(rope: _RopeSource, lay: Layout) -> None:
    """Refuse to run when an M-RoPE model rotated q/k at other (t, h, w) positions than the VTU batch planned."""
    expected = lay.expected_rope.permute(2, 0, 1)  # [P, B, Sq]
    pos = rope.positions
    ok = pos is not None and pos.dim() == 3 and pos.shape[-1] == expected.shape[-1]
    if ok:
        pos = pos[-expected.shape[0]:] if pos.shape[0] > expected.shape[0] else pos
        ok = bool(torch.equal(pos.to(expected.device).expand_as(expected), expected))
    if not ok:
        got = "none" if pos is None else f"{tuple(pos.shape)}: {pos[..., :1, :4].tolist()}"
        raise ValueError(
            f"VTU: the model's M-RoPE position ids do not match the VTU batch (expected {tuple(expected.shape)}: "
            f"{expected[:, :1, :4].tolist()}, got {got}). Pass position_ids=batch.model_position_ids to "
            "forward/generate; positions numbered from the merged slots would continue at M instead of the stock "
            "positions."
        )


def _check_positions(module: nn.Module, kwargs: dict[str, Any], lay: Layout) -> None:
    """Refuse to run when the model rotated q/k at other positions than the VTU batch planned."""
    rope = getattr(module, _ROPE_ATTR)
    if rope.components is not None:
        return _check_mrope_positions(rope, lay)
    pos = kwargs.get("position_ids")
    expected = lay.expected_positions
    ok = pos is not None and pos.shape[-1] == expected.shape[-1]
    if ok:
        ok = bool(torch.equal(pos.to(expected.device).expand_as(expected), expected))
    if not ok:
        got = "none" if pos is None else f"{tuple(pos.shape)} starting {pos.reshape(-1)[:4].tolist()}"
        raise ValueError(
            "VTU: the model's position_ids do not match the VTU batch (expected "
            f"{tuple(expected.shape)} starting {expected.reshape(-1)[:4].tolist()}, got {got}). Pass "
            "position_ids=batch.position_ids and attention_mask=batch.attention_mask to forward/generate; "
            "without them generate numbers merged slots 0..M-1 and continues at M instead of N."
        )


def _attention_function(mode: str) -> Callable[..., tuple[Tensor, None]]:
    """The attention function registered for ``mode`` (transformers' attention-function contract)."""
    kernel = KERNELS[mode]

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
        _check_rope_kind(rope, batch)
        lay = batch.layout(query, key)
        if getattr(module, "layer_idx", 0) == 0:  # one check per forward is enough
            _check_positions(module, kwargs, lay)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        # decode steps (new tokens are groups of one): the exact kernel turns the merged keys per virtual key
        # without copying K/V to virtual length, which is what makes a fast-mode step cost more than a stock one
        step = KERNELS["exact"] if lay.identity_q and DECODE_WITH_EXACT else kernel
        with torch.profiler.record_function(PROFILER_LABEL):  # so profiles can tell its ops from the model's
            return step(query, key, value, lay, rope.inv_freq, scaling, dropout), None

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
    source = _RopeSource(info.rotary)
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
