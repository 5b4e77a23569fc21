"""Loading VLMs with DyMU: LLaVA-1.5 (llava-hf checkpoints with an optional ``dymu`` config block, and original
LLaVA checkpoints, ``LlavaLlamaForCausalLM`` with ``mm_vision_tower``) and LLaVA-OneVision (llava-hf checkpoints,
``model_type`` ``llava_onevision``, with an optional ``dymu`` block) and Qwen2-VL / Qwen2.5-VL / Qwen3-VL (likewise).

* :func:`load` dispatches on the checkpoint's ``config.json`` to :func:`load_llava` or :func:`load_onevision`.
* every loader takes a local folder or a hub name (``llava-hf/llava-1.5-7b-hf``), as ``from_pretrained`` does:
  the Hugging Face cache, downloads, ``HF_HUB_OFFLINE``; a repository that cannot be had is named, with how to
  point to a local folder instead (:mod:`dymu.hub`).
* llava-hf format: ``config.json`` may hold a block
  ``"dymu": {"encoder": "ViT-L-14-336-tome-72out", "thresholds": "…", "vtu": "fast"}`` (OneVision: also
  ``"downsample": "nearest" | "error"``; ``dymu convert-onevision`` writes it). Its ``prompt_suffix`` (the
  checkpoint's prompt format, :func:`dymu.vlm.settings.prompt_suffix`) is not a DyMU setting: a block holding only
  that leaves DyMU off.
* original format: ``mm_vision_tower`` names the CLIP tower; naming a DyMU tower instead
  (``ViT-L-14-336-tome-72out``) turns DyMU on — the habit of the authors' code. transformers ships no
  converter for these checkpoints: :func:`convert_original_llava` (:mod:`dymu.vlm.original`) builds the
  llava-hf model in memory (and ``dymu convert-llava`` saves it). Original LLaVA-OneVision checkpoints
  (``LlavaQwenForCausalLM``) are not read: use their llava-hf conversions (e.g.
  ``llava-hf/llava-onevision-qwen2-7b-si-hf``).
* the config is read and the family told apart in :mod:`dymu.vlm.checkpoints`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from dymu.baselines import SELECTIONS, Method
from dymu.data import describe_preprocess
from dymu.encoders.names import is_dymu_name, parse_dymu_name
from dymu.encoders.patching import resolve_thresholds_path
from dymu.hub import explain, hub_file, is_hub_name
from dymu.thresholds import load_thresholds
from dymu.vlm.checkpoints import (  # noqa: F401  (re-exported: their home was this module)
    LOCAL_HINT,
    ONEVISION_MODEL_TYPE,
    is_onevision,
    is_original_llava,
    is_original_onevision,
    original_onevision_error,
    read_config,
)
from dymu.vlm.llava import enable_dymu
from dymu.vlm.onevision import Downsample, enable_dymu_onevision
from dymu.vlm.original import LLAVA_V1_TEMPLATE, convert_original_llava, dymu_tower  # noqa: F401  (re-exported)
from dymu.vlm.qwen_vl import MODEL_CLASSES as QWEN_MODEL_TYPES, enable_dymu_qwen
from dymu.vlm.settings import ConfigBlock, settings_block
from dymu.vtu import VTUMode


def load_llava(
    path: str | Path,
    *,
    thresholds: Any = None,
    vtu: VTUMode | None = None,
    threshold_offset: float | None = None,
    vision_tower: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    dymu: bool | None = None,
    method: Method = "dymu",
    token_budget: int | None = None,
) -> tuple[nn.Module, Any]:
    """Load LLaVA-1.5 (llava-hf or original format) with DyMU as its config asks; returns (model, processor).

    DyMU is on when ``config.json`` has a ``dymu`` block, when an original checkpoint's ``mm_vision_tower``
    names a DyMU tower, or when ``thresholds`` is given; ``dymu=False`` forces it off, ``dymu=True`` on
    (merging off without thresholds: stock outputs). Keyword arguments override the config's settings.
    ``method``/``token_budget``: a baseline of :mod:`dymu.baselines` instead of DyMU (the block's thresholds are then
    not used).
    """
    raw = read_config(path)
    if is_onevision(raw):
        raise ValueError(
            f"{path} is a LLaVA-OneVision checkpoint (model_type {ONEVISION_MODEL_TYPE!r}), not LLaVA-1.5: load it "
            "with dymu.vlm.load (any supported VLM) or dymu.vlm.load_onevision"
        )
    if is_original_onevision(raw):
        raise original_onevision_error(path)
    if is_original_llava(raw):
        model, processor, implied = convert_original_llava(path, vision_tower=vision_tower, torch_dtype=torch_dtype)
        block = implied if implied.encoder is not None else None
    else:
        model, processor, block = _load_stock(path, raw, "llava", LlavaForConditionalGeneration, torch_dtype)
    _enable_as_asked(enable_dymu, model, path, block, dymu=dymu, thresholds=thresholds, vtu=vtu,
                     threshold_offset=threshold_offset, method=method, token_budget=token_budget, processor=processor)
    return model, processor


def _fits_processor(chosen: Any, processor: Any) -> Any:
    """The threshold checkpoint ``chosen`` names, checked against what ``processor`` makes of an image: another
    input size is refused now (not at the first image), another recorded preprocessing gets a warning."""
    if not isinstance(chosen, (str, Path)):
        return chosen
    ckpt = load_thresholds(resolve_thresholds_path(chosen))
    size = processor.image_processor(Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"].shape[-2:]
    ckpt.check(input_size=(int(size[0]), int(size[1])))
    now = describe_preprocess(processor.image_processor)
    if ckpt.preprocess and now and now != ckpt.preprocess:
        warnings.warn(f"{chosen}: the thresholds were found on images preprocessed as '{ckpt.preprocess}', the "
                      f"model's processor does '{now}': token counts will differ from what they were found for",
                      stacklevel=3)
    return chosen


def _chosen_thresholds(path: str | Path, settings: ConfigBlock, thresholds: Any) -> Any:
    """``thresholds`` if given, else the block's file (relative to the checkpoint folder) or encoder name's."""
    chosen = thresholds if thresholds is not None else settings.thresholds
    if chosen is None and settings.encoder is not None:
        chosen = parse_dymu_name(settings.encoder).find_checkpoint()
    if isinstance(chosen, str) and not Path(chosen).is_absolute():
        # a path in the dymu block is relative to the checkpoint folder (or repository)
        if is_hub_name(path):
            if thresholds is None and not is_dymu_name(chosen):
                chosen = hub_file(str(path), chosen, what=f"cannot load the thresholds of {path}", local_hint=LOCAL_HINT)
        elif (Path(path) / chosen).is_file():
            chosen = Path(path) / chosen
    return chosen


def _load_stock(
    path: str | Path, raw: dict[str, Any], family: str, model_class: Any, torch_dtype: torch.dtype | None
) -> tuple[nn.Module, Any, ConfigBlock | None]:
    """The stock model and processor of a checkpoint folder, and its ``dymu`` block (checked before loading;
    ``None`` where there is none)."""
    block = settings_block(raw)
    settings = ConfigBlock.from_dict(block, family=family) if block is not None else None
    with explain(path, what=f"cannot load {path}", local_hint=LOCAL_HINT):
        model = model_class.from_pretrained(path, dtype=torch_dtype).eval()
        processor = AutoProcessor.from_pretrained(path)
    return model, processor, settings


def _enable_as_asked(
    enable: Callable[..., nn.Module],
    model: nn.Module,
    path: str | Path,
    block: ConfigBlock | None,
    *,
    dymu: bool | None,
    thresholds: Any,
    vtu: VTUMode | None,
    threshold_offset: float | None,
    method: Method,
    token_budget: int | None,
    processor: Any = None,
    **options: Any,
) -> None:
    """Call a family's ``enable`` with the keyword arguments over the block's settings, unless DyMU stays off
    (``dymu=False``, or no block, no thresholds, no baseline and ``dymu`` not forced on). A selection baseline gets
    ``vtu=None`` unless asked (its own default, ``"off"``); ``processor``: check DyMU's thresholds against it."""
    if dymu is False or (block is None and thresholds is None and dymu is not True and method == "dymu"):
        return
    settings = block or ConfigBlock()
    chosen = thresholds
    if method == "dymu":
        chosen = _chosen_thresholds(path, settings, thresholds)
        if processor is not None:
            chosen = _fits_processor(chosen, processor)
    enable(
        model,
        chosen,
        vtu=vtu or (None if method in SELECTIONS else settings.vtu),
        threshold_offset=settings.threshold_offset if threshold_offset is None else threshold_offset,
        method=method,
        token_budget=token_budget,
        **options,
    )


def load_onevision(
    path: str | Path,
    *,
    thresholds: Any = None,
    vtu: VTUMode | None = None,
    threshold_offset: float | None = None,
    downsample: Downsample | None = None,
    torch_dtype: torch.dtype | None = None,
    dymu: bool | None = None,
    method: Method = "dymu",
    token_budget: int | None = None,
) -> tuple[nn.Module, Any]:
    """Load a llava-hf LLaVA-OneVision checkpoint with DyMU as its config asks; returns (model, processor).

    DyMU (:func:`dymu.vlm.onevision.enable_dymu_onevision`, token order ``"batch"``) is on when ``config.json``
    has a ``dymu`` block (keys ``encoder``, ``thresholds``, ``vtu``, ``threshold_offset``, ``downsample``) or when
    ``thresholds`` is given; ``dymu=False`` forces it off (the stock model), ``dymu=True`` on (merging off without
    thresholds: stock outputs except for downsampled images). Keyword arguments override the config's settings.
    """
    raw = read_config(path)
    if not is_onevision(raw):
        if is_original_onevision(raw):
            raise original_onevision_error(path)
        raise ValueError(
            f"{path} is not a LLaVA-OneVision checkpoint (model_type {raw.get('model_type')!r}, expected "
            f"{ONEVISION_MODEL_TYPE!r}): load LLaVA-1.5 with dymu.vlm.load or dymu.vlm.load_llava"
        )
    model, processor, block = _load_stock(path, raw, "onevision", LlavaOnevisionForConditionalGeneration, torch_dtype)
    downsample = downsample or (block.downsample if block else None) or "nearest"
    _enable_as_asked(enable_dymu_onevision, model, path, block, dymu=dymu, thresholds=thresholds, vtu=vtu,
                     threshold_offset=threshold_offset, method=method, token_budget=token_budget, downsample=downsample)
    return model, processor


def load_qwen(
    path: str | Path,
    *,
    thresholds: Any = None,
    vtu: VTUMode | None = None,
    threshold_offset: float | None = None,
    torch_dtype: torch.dtype | None = None,
    dymu: bool | None = None,
    method: Method = "dymu",
    token_budget: int | None = None,
) -> tuple[nn.Module, Any]:
    """Load a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint with DyMU as its config asks; returns (model, processor).

    As :func:`load_onevision` (``dymu`` block keys ``encoder``, ``thresholds``, ``vtu``, ``threshold_offset``; a
    baseline ``method`` turns DyMU on too); :func:`dymu.vlm.qwen_vl.enable_dymu_qwen` does the rest."""
    raw = read_config(path)
    if raw.get("model_type") not in QWEN_MODEL_TYPES:
        raise ValueError(f"{path} is not a Qwen-VL checkpoint (model_type {raw.get('model_type')!r}, expected one "
                         f"of {', '.join(QWEN_MODEL_TYPES)})")
    model, processor, block = _load_stock(path, raw, "qwen_vl", AutoModelForImageTextToText, torch_dtype)
    _enable_as_asked(enable_dymu_qwen, model, path, block, dymu=dymu, thresholds=thresholds, vtu=vtu,
                     threshold_offset=threshold_offset, method=method, token_budget=token_budget)
    return model, processor


def load(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    downsample: Downsample | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load any VLM dymu supports with DyMU as its config asks; returns (model, processor).

    Dispatches on ``config.json``: ``model_type`` ``llava_onevision`` goes to :func:`load_onevision`,
    ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl`` to :func:`load_qwen`, LLaVA-1.5
    (llava-hf or original) to :func:`load_llava`. The other keyword arguments (``thresholds``, ``vtu``,
    ``threshold_offset``, ``torch_dtype``, ``dymu``) are theirs; ``vision_tower`` is for original LLaVA-1.5
    checkpoints only, ``downsample`` for OneVision only.
    """
    raw = read_config(path)
    if raw.get("model_type") in QWEN_MODEL_TYPES:
        if vision_tower is not None or downsample is not None:
            raise ValueError(f"vision_tower and downsample are for LLaVA checkpoints; {path} is {raw['model_type']}")
        return load_qwen(path, **kwargs)
    if is_onevision(raw):
        if vision_tower is not None:
            raise ValueError(
                f"vision_tower is for original LLaVA-1.5 checkpoints; {path} is LLaVA-OneVision (its tower is inside)"
            )
        return load_onevision(path, downsample=downsample, **kwargs)
    if downsample is not None:
        raise ValueError(f"downsample is for LLaVA-OneVision checkpoints; {path} is LLaVA-1.5")
    return load_llava(path, vision_tower=vision_tower, **kwargs)
