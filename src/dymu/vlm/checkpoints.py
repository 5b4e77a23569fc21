"""Reading a VLM checkpoint's ``config.json`` (a local folder or a hub name) and telling its family apart:
llava-hf LLaVA-1.5, llava-hf LLaVA-OneVision, Qwen-VL, or an original LLaVA checkpoint (``mm_vision_tower``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dymu.hub import hub_file, is_hub_name

LOCAL_HINT = "or pass the checkpoint's local folder instead (--model FOLDER; library: load('/path/to/folder'))"
ONEVISION_MODEL_TYPE = "llava_onevision"


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder or of a hub repository (cached, or downloaded unless offline)."""
    if is_hub_name(path):
        config_file = hub_file(str(path), "config.json", what=f"cannot load {path}", local_hint=LOCAL_HINT)
    else:
        config_file = Path(path) / "config.json"
    if not config_file.is_file():
        where = Path(path).absolute()
        raise FileNotFoundError(
            f"no config.json in {where}: expected a llava-hf or original LLaVA checkpoint folder, or a hub name"
        )
    return json.loads(config_file.read_text())


def is_original_llava(config: dict[str, Any]) -> bool:
    return "mm_vision_tower" in config and config.get("model_type") != "llava"


def is_onevision(config: dict[str, Any]) -> bool:
    """A llava-hf LLaVA-OneVision checkpoint (``LlavaOnevisionForConditionalGeneration``)."""
    return config.get("model_type") == ONEVISION_MODEL_TYPE


def is_original_onevision(config: dict[str, Any]) -> bool:
    """An original LLaVA-OneVision / LLaVA-NeXT checkpoint (``LlavaQwenForCausalLM``, e.g. lmms-lab's), which
    dymu does not read."""
    return "mm_vision_tower" in config and (
        "LlavaQwenForCausalLM" in (config.get("architectures") or []) or config.get("model_type") == "llava_qwen"
    )


def original_onevision_error(path: str | Path) -> ValueError:
    return ValueError(
        f"{path} is an original LLaVA-OneVision checkpoint (LlavaQwenForCausalLM), which dymu does not read: use its "
        "llava-hf conversion (e.g. llava-hf/llava-onevision-qwen2-7b-si-hf for lmms-lab/llava-onevision-qwen2-7b-si)"
    )
