"""The ``dymu`` block of a VLM checkpoint's ``config.json`` (all keys optional): DyMU's settings and the
checkpoint's prompt format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dymu.vtu import VTUMode, check_vtu_mode


@dataclass
class ConfigBlock:
    """What a ``dymu`` block in ``config.json`` holds; ``downsample`` is LLaVA-OneVision's (:mod:`dymu.vlm.onevision`)."""

    encoder: str | None = None  # DyMU encoder name, e.g. "ViT-L-14-336-tome-72out"
    thresholds: str | None = None  # threshold checkpoint path (default: the encoder name's checkpoint)
    vtu: VTUMode = "fast"
    threshold_offset: float = 0.0
    downsample: str | None = None  # OneVision: images past anyres_max_N (None: "nearest")

    KEYS = {  # the keys each model family's block may hold
        "llava": ("encoder", "thresholds", "vtu", "threshold_offset"),
        "onevision": ("encoder", "thresholds", "vtu", "threshold_offset", "downsample"),
        "qwen_vl": ("encoder", "thresholds", "vtu", "threshold_offset"),
    }

    @classmethod
    def from_dict(cls, block: dict[str, Any], family: str = "llava") -> "ConfigBlock":
        """Read a ``dymu`` block of a ``family`` checkpoint (``"llava"``: LLaVA-1.5, ``"onevision"``, ``"qwen_vl"``)."""
        if not isinstance(block, dict):
            raise ValueError(f"the 'dymu' config block must be a JSON object, got {type(block).__name__}")
        valid = cls.KEYS[family]
        unknown = set(block) - set(valid)
        if unknown:
            raise ValueError(
                f"unknown keys in the 'dymu' config block: {sorted(unknown)}; expected {', '.join(valid)}"
            )
        settings = cls(**block)
        check_vtu_mode(settings.vtu, "dymu.vtu")
        if settings.downsample not in (None, "nearest", "error"):
            raise ValueError(f"dymu.downsample must be 'nearest' or 'error', got {settings.downsample!r}")
        return settings


# keys of a checkpoint's "dymu" config block that describe its prompt format, not DyMU's settings: a block holding
# only these leaves DyMU off
PROMPT_FORMAT_KEYS = ("prompt_suffix",)


def settings_block(config: dict[str, Any]) -> dict[str, Any] | None:
    """A ``config.json``'s ``dymu`` block without its prompt-format keys; None where nothing else is in it."""
    block = config.get("dymu")
    if isinstance(block, dict):
        block = {k: v for k, v in block.items() if k not in PROMPT_FORMAT_KEYS} or None
    return block


def prompt_suffix(model: Any) -> str | None:
    """The text a checkpoint says to append to each question (``"prompt_suffix"`` in its ``dymu`` config block,
    e.g. written by :func:`dymu.small_vlm.build_small_vlm`); None where it says nothing. ``model``: a model or
    its config."""
    block = getattr(getattr(model, "config", model), "dymu", None)
    suffix = block.get("prompt_suffix") if isinstance(block, dict) else None
    if suffix is not None and not isinstance(suffix, str):
        raise ValueError(f"the 'dymu' config block's prompt_suffix must be a string, got {type(suffix).__name__}")
    return suffix
