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
  converter for these checkpoints: :func:`convert_original_llava` builds the llava-hf model in memory
  (and ``dymu convert-llava`` saves it). Original LLaVA-OneVision checkpoints (``LlavaQwenForCausalLM``) are
  not read: use their llava-hf conversions (e.g. ``llava-hf/llava-onevision-qwen2-7b-si-hf``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
)

from dymu.encoders.names import is_dymu_name, parse_dymu_name
from dymu.hub import explain, hub_file, is_hub_name
from dymu.baselines import SELECTIONS, Method
from dymu.vlm.llava import enable_dymu
from dymu.vlm.onevision import Downsample, enable_dymu_onevision
from dymu.vlm.qwen_vl import MODEL_CLASSES as QWEN_MODEL_TYPES, enable_dymu_qwen
from dymu.vlm.settings import ConfigBlock, settings_block
from dymu.vtu import VTUMode

# transformers' names for the original checkpoint's weights
ORIGINAL_KEY_MAPPING = {
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
    r"^model\.(embed_tokens|layers|norm)\.": r"model.language_model.\1.",
}
LLAMA_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "attention_bias",
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_V1_TEMPLATE = (
    "{{ '" + LLAVA_V1_SYSTEM + "' }}"
    "{% for m in messages %}{{ ' ' + m['role'].upper() + ': ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


LOCAL_HINT = "or pass the checkpoint's local folder instead (--model FOLDER; library: load('/path/to/folder'))"


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


def _tower_hint(tower: str) -> str:
    return (
        f"or pass a local copy of the CLIP tower {tower} with --vision-tower FOLDER "
        "(library: vision_tower='/path/to/folder')"
    )


def is_original_llava(config: dict[str, Any]) -> bool:
    return "mm_vision_tower" in config and config.get("model_type") != "llava"


ONEVISION_MODEL_TYPE = "llava_onevision"


def is_onevision(config: dict[str, Any]) -> bool:
    """A llava-hf LLaVA-OneVision checkpoint (``LlavaOnevisionForConditionalGeneration``)."""
    return config.get("model_type") == ONEVISION_MODEL_TYPE


def is_original_onevision(config: dict[str, Any]) -> bool:
    """An original LLaVA-OneVision / LLaVA-NeXT checkpoint (``LlavaQwenForCausalLM``, e.g. lmms-lab's), which
    dymu does not read."""
    return "mm_vision_tower" in config and (
        "LlavaQwenForCausalLM" in (config.get("architectures") or []) or config.get("model_type") == "llava_qwen"
    )


def _original_onevision_error(path: str | Path) -> ValueError:
    return ValueError(
        f"{path} is an original LLaVA-OneVision checkpoint (LlavaQwenForCausalLM), which dymu does not read: use its "
        "llava-hf conversion (e.g. llava-hf/llava-onevision-qwen2-7b-si-hf for lmms-lab/llava-onevision-qwen2-7b-si)"
    )


def dymu_tower(name: str):
    """The parsed DyMU name if ``mm_vision_tower`` names a DyMU tower (``ViT-L-14-336-tome-72out``), else None."""
    return parse_dymu_name(name) if is_dymu_name(name) else None


def convert_original_llava(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any, ConfigBlock]:
    """Build a llava-hf ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` from an original LLaVA-1.5 folder.

    ``vision_tower`` overrides where the CLIP tower's weights are loaded from (a local folder or hub name);
    by default ``mm_vision_tower`` is used, or for a DyMU name its base encoder. Returns the model, the processor
    and the DyMU settings implied by ``mm_vision_tower`` (encoder set when it names a DyMU tower).
    """
    path = path if is_hub_name(path) else Path(path)
    raw = read_config(path)
    if not is_original_llava(raw):
        raise ValueError(f"{path} is not an original LLaVA checkpoint (no mm_vision_tower in config.json)")
    projector = raw.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {projector!r} is not supported; expected 'mlp2x_gelu' (LLaVA-1.5)")
    tower_name = raw["mm_vision_tower"]
    dymu_name = dymu_tower(tower_name)
    settings = ConfigBlock(encoder=dymu_name.name if dymu_name else None)
    tower_source = vision_tower or (dymu_name.hf_name if dymu_name else tower_name)
    if tower_source is None:
        raise ValueError(f"mm_vision_tower {tower_name!r} has no known weights: pass vision_tower=<folder or hub name>")
    with explain(tower_source, what=f"cannot load the CLIP tower of {path} (mm_vision_tower)", local_hint=_tower_hint(tower_source)):
        tower = CLIPVisionModel.from_pretrained(tower_source, dtype=torch_dtype)
        base_processor = AutoImageProcessor.from_pretrained(tower_source)
    with explain(path, what=f"cannot load {path}", local_hint=LOCAL_HINT):
        tokenizer = AutoTokenizer.from_pretrained(path)
    added = [t for t in ("<image>", "<pad>") if t not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<pad>"
    tokenizer.padding_side = "left"
    text_config = LlamaConfig(**{k: raw[k] for k in LLAMA_KEYS if k in raw})
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {select!r} is not supported; expected 'patch' or 'cls_patch'")
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    with explain(path, what=f"cannot load {path}", local_hint=LOCAL_HINT):
        model = LlavaForConditionalGeneration.from_pretrained(
            path, config=config, key_mapping=ORIGINAL_KEY_MAPPING, dtype=torch_dtype
        )
    model.model.vision_tower.load_state_dict(tower.state_dict())  # the tower is not in the original checkpoint
    # transformers records the key mapping and reverts it in save_pretrained; a converted model must save as llava-hf
    model.__dict__.pop("_weight_conversions", None)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.eval()

    image_args = {
        k: v for k, v in base_processor.to_dict().items() if k not in ("image_processor_type", "processor_class", "_processor_class")
    }
    # image_aspect_ratio 'pad': pad to a square with the mean colour before resizing, as LLaVA-1.5 does
    image_processor = LlavaImageProcessor(**image_args, do_pad=raw.get("image_aspect_ratio") == "pad")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_V1_TEMPLATE,
    )
    return model, processor, settings


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
        raise _original_onevision_error(path)
    if is_original_llava(raw):
        model, processor, settings = convert_original_llava(path, vision_tower=vision_tower, torch_dtype=torch_dtype)
        settings = settings if settings.encoder is not None else None
    else:
        with explain(path, what=f"cannot load {path}", local_hint=LOCAL_HINT):
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
            processor = AutoProcessor.from_pretrained(path)
        block = settings_block(raw)
        settings = ConfigBlock.from_dict(block) if block is not None else None
    if dymu is False or (settings is None and thresholds is None and dymu is not True and method == "dymu"):
        return model, processor
    settings = settings or ConfigBlock()
    chosen = _fits_processor(_chosen_thresholds(path, settings, thresholds), processor) if method == "dymu" else thresholds
    enable_dymu(
        model,
        chosen,
        vtu=vtu or (None if method in SELECTIONS else settings.vtu),
        threshold_offset=settings.threshold_offset if threshold_offset is None else threshold_offset,
        method=method,
        token_budget=token_budget,
    )
    return model, processor


def _fits_processor(chosen: Any, processor: Any) -> Any:
    """The threshold checkpoint ``chosen`` names, checked against what ``processor`` makes of an image: another
    input size is refused now (not at the first image), another recorded preprocessing gets a warning."""
    import warnings

    from PIL import Image

    from dymu.data import describe_preprocess
    from dymu.encoders.patching import resolve_thresholds_path
    from dymu.thresholds import load_thresholds

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
    path: str | Path, raw: dict[str, Any], family: str, model_class: Any, torch_dtype: torch.dtype | None,
    dymu: bool | None, thresholds: Any, method: Method,
) -> tuple[nn.Module, Any, ConfigBlock | None]:
    """The stock model and processor of a checkpoint folder, and its ``dymu`` block (checked before loading);
    the block is ``None`` when DyMU stays off (no block, no thresholds, no baseline, and ``dymu`` not forced)."""
    block = settings_block(raw)
    settings = ConfigBlock.from_dict(block, family=family) if block is not None else None
    with explain(path, what=f"cannot load {path}", local_hint=LOCAL_HINT):
        model = model_class.from_pretrained(path, dtype=torch_dtype).eval()
        processor = AutoProcessor.from_pretrained(path)
    if dymu is False or (settings is None and thresholds is None and dymu is not True and method == "dymu"):
        return model, processor, None
    return model, processor, settings or ConfigBlock()


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
            raise _original_onevision_error(path)
        raise ValueError(
            f"{path} is not a LLaVA-OneVision checkpoint (model_type {raw.get('model_type')!r}, expected "
            f"{ONEVISION_MODEL_TYPE!r}): load LLaVA-1.5 with dymu.vlm.load or dymu.vlm.load_llava"
        )
    model, processor, settings = _load_stock(
        path, raw, "onevision", LlavaOnevisionForConditionalGeneration, torch_dtype, dymu, thresholds, method
    )
    if settings is None:
        return model, processor
    enable_dymu_onevision(
        model,
        _chosen_thresholds(path, settings, thresholds) if method == "dymu" else thresholds,
        method=method,
        token_budget=token_budget,
        vtu=vtu or settings.vtu,
        threshold_offset=settings.threshold_offset if threshold_offset is None else threshold_offset,
        downsample=downsample or settings.downsample or "nearest",
    )
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
    model, processor, settings = _load_stock(
        path, raw, "qwen_vl", AutoModelForImageTextToText, torch_dtype, dymu, thresholds, method
    )
    if settings is None:
        return model, processor
    enable_dymu_qwen(
        model,
        _chosen_thresholds(path, settings, thresholds) if method == "dymu" else thresholds,
        vtu=vtu or (None if method in SELECTIONS else settings.vtu),
        threshold_offset=settings.threshold_offset if threshold_offset is None else threshold_offset,
        method=method,
        token_budget=token_budget,
    )
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
