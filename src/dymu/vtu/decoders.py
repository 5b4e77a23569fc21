"""Decoder-family knowledge for VTU: find a model's RoPE text decoder and check that VTU applies.

VTU plugs into transformers through one generic hook, an attention function registered with
``AttentionInterface`` (:mod:`dymu.vtu.integration`), so no decoder file is copied and no class is swapped.
What differs between families is only *whether* that hook is valid for a given model:

* :func:`find_decoder` locates the text decoder inside a ``*ForCausalLM``, a bare ``*Model`` or a VLM
  (e.g. ``LlavaForConditionalGeneration``, whose text model is ``model.model.language_model``) and
  returns a :class:`DecoderInfo` with its config, the sub-config key to pass to
  ``set_attn_implementation``, its rotary embedding and its attention modules;
* :func:`check_vtu_support` raises a :class:`ValueError` naming the problem when VTU would be wrong:
  a family that was not checked, a decoder without RoPE, partial rotary dims, RoPE scaling whose
  angles are not plain ``position * inv_freq`` (YaRN, LongRoPE, ...), or a sliding window in use.

Supported families: ``llama``, ``qwen2``, ``mistral``, and with M-RoPE the text models of Qwen2-VL, Qwen2.5-VL and
Qwen3-VL (their attention modules share the contract VTU relies on: q/k rotated with ``rotate_half`` RoPE before
the attention function is called, and ``num_key_value_groups`` for GQA; Qwen3-VL's q/k norms act before RoPE, on
merged tokens, so they need nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dymu.vtu.mrope import MROPE_MODEL_TYPES

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "DecoderInfo",
    "find_decoder",
    "check_vtu_support",
]

#: ``config.model_type`` of the text decoders VTU was checked on (the Qwen-VL ones use M-RoPE, :mod:`dymu.vtu.mrope`).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "mistral") + MROPE_MODEL_TYPES

#: RoPE types whose angles are ``position * inv_freq`` with no extra scaling of cos/sin, so that a
#: rotated key can be re-rotated to another position by the angle difference alone.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "llama3")


@dataclass
class DecoderInfo:
    """Where VTU plugs into one model.

    Attributes:
        decoder: the text decoder module (``LlamaModel``, ``Qwen2Model``, ...), the one owning
            ``layers`` and ``rotary_emb``.
        config: its config (``model.config`` for a causal LM, ``model.config.text_config`` for a VLM).
        config_key: the key of ``config`` among the top model's sub-configs (``"text_config"``), or
            ``None`` when ``config`` is the top config; decides how ``set_attn_implementation`` is
            called so that a vision tower keeps its own attention.
        rotary: the decoder's rotary embedding (its ``inv_freq`` gives the pure RoPE angles).
        attentions: the self-attention module of every decoder layer.
    """

    decoder: nn.Module
    config: object
    config_key: str | None
    rotary: nn.Module
    attentions: list[nn.Module] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "?"))


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type {getattr(config, 'model_type', '?')!r})"


def find_decoder(model: nn.Module) -> DecoderInfo:
    """Locate the RoPE text decoder of ``model`` and check VTU supports it.

    Accepts a ``*ForCausalLM``, a bare decoder ``*Model`` or a VLM whose text model is one of
    :data:`SUPPORTED_MODEL_TYPES`. The decoder is the first sub-module (in ``model.modules()`` order,
    ``model`` itself included) that has ``layers``, ``rotary_emb`` and a ``config``.

    Raises:
        ValueError: no such decoder (e.g. GPT-2, which has learned absolute positions), or one that
            VTU does not support (see :func:`check_vtu_support`).
    """
    decoder = None
    for module in model.modules():
        if hasattr(module, "layers") and hasattr(module, "rotary_emb") and hasattr(module, "config"):
            decoder = module
            break
    if decoder is None:
        raise ValueError(
            f"VTU needs a RoPE text decoder (one of {', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"{_describe(model)} has no sub-module with `layers` and `rotary_emb`."
        )
    config = decoder.config
    config_key = None
    top = getattr(model, "config", None)
    if top is not None and top is not config:
        for key in getattr(top, "sub_configs", {}) or {}:
            if getattr(top, key, None) is config:
                config_key = key
                break
        else:
            raise ValueError(
                f"VTU found the text decoder {_describe(decoder)} inside {_describe(model)}, but its config "
                "is not one of the model's sub_configs, so its attention cannot be switched alone."
            )
    attentions = []
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ValueError(f"VTU: decoder layer {i} of {_describe(decoder)} has no `self_attn` module.")
        attentions.append(attn)
    info = DecoderInfo(decoder, config, config_key, decoder.rotary_emb, attentions)
    check_vtu_support(info)
    return info


def check_vtu_support(info: DecoderInfo) -> None:
    """Raise a :class:`ValueError` saying what is wrong when VTU would not be exact on this decoder."""
    name = _describe(info.decoder)
    if info.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"VTU supports text decoders of model_type {', '.join(SUPPORTED_MODEL_TYPES)}; got {name}."
        )
    config = info.config
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = getattr(info.rotary, "rope_type", None) or rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"VTU re-rotates keys by plain RoPE angles (position * inv_freq), which is exact only for rope_type "
            f"in {SUPPORTED_ROPE_TYPES}; {name} uses rope_type {rope_type!r} (its angles or cos/sin scaling "
            "depend on the sequence length)."
        )
    if float(getattr(info.rotary, "attention_scaling", 1.0)) != 1.0:
        raise ValueError(
            f"VTU expects unscaled RoPE cos/sin (attention_scaling 1.0); {name} has "
            f"attention_scaling {info.rotary.attention_scaling}."
        )
    inv_freq = getattr(info.rotary, "inv_freq", None)
    if inv_freq is None:
        raise ValueError(f"VTU: the rotary embedding of {name} has no `inv_freq` buffer.")
    for attn in info.attentions:
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None or not hasattr(attn, "num_key_value_groups"):
            raise ValueError(
                f"VTU: attention module {type(attn).__name__} of {name} lacks `head_dim` / `num_key_value_groups`."
            )
        if 2 * inv_freq.numel() != head_dim:
            raise ValueError(
                f"VTU needs RoPE over the whole head: expected {head_dim // 2} frequencies for head_dim {head_dim}, "
                f"{name} has {inv_freq.numel()} (partial rotary is not supported)."
            )
    # Sliding windows would have to apply at virtual positions, and the sliding-window cache would
    # drop merged-length entries by the wrong count: refuse rather than be silently wrong.
    layer_types = list(getattr(config, "layer_types", None) or [])
    sliding_layers = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    sliding_layers += [
        i for i, attn in enumerate(info.attentions)
        if getattr(attn, "sliding_window", None) is not None and i not in sliding_layers
    ]
    window = getattr(config, "sliding_window", None)
    if info.model_type == "mistral" and window is not None:
        sliding_layers = list(range(len(info.attentions)))
    if sliding_layers:
        raise ValueError(
            f"VTU does not support sliding-window attention, but {name} uses sliding_window={window} on layers "
            f"{sorted(set(sliding_layers))}; expected full attention on every layer (Qwen2: use_sliding_window=False; "
            "Mistral: sliding_window=None)."
        )
