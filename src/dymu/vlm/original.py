"""Original LLaVA-1.5 checkpoints (``LlavaLlamaForCausalLM`` with ``mm_vision_tower``), which transformers ships
no converter for: :func:`convert_original_llava` builds the llava-hf model and processor in memory (``dymu
convert-llava`` saves them). ``mm_vision_tower`` naming a DyMU tower (``ViT-L-14-336-tome-72out``) instead of the
CLIP tower turns DyMU on — the habit of the authors' code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
)

from dymu.encoders.names import is_dymu_name, parse_dymu_name
from dymu.hub import explain, is_hub_name
from dymu.vlm.checkpoints import LOCAL_HINT, is_original_llava, read_config
from dymu.vlm.settings import ConfigBlock

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


def _tower_hint(tower: str) -> str:
    return (
        f"or pass a local copy of the CLIP tower {tower} with --vision-tower FOLDER "
        "(library: vision_tower='/path/to/folder')"
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
