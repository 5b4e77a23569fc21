"""The small real VLM's model: config, processor, the trained projector (+ merged LoRA), its threshold sets.

Everything is stock transformers: the model is a ``LlavaForConditionalGeneration`` (``model.model.vision_tower``
is a ``Dinov2Model``, ``model.model.language_model`` a ``LlamaModel``) and the processor a ``LlavaProcessor``
(``BitImageProcessor`` squashing any image to 224×224 with bicubic resampling and ImageNet mean/std, the SmolLM2
tokenizer, a chat template that is SmolLM2's with image items rendered as the image token). At 224 px DINOv2
gives 1 CLS + 256 patch tokens; ``vision_feature_select_strategy="default"`` drops CLS, so each image is 256
placeholder tokens. The image token is SmolLM2's ``<empty_output>`` (id 16), a real vocabulary entry that chat
text never contains.

``build_small_vlm(projector_weights)`` loads a trained projector (and, if the file holds them, LoRA deltas that
are merged into the language model's linear layers) from a safetensors file, e.g. the committed one (trained by
``dymu train-projector``), which ships inside the package: ``dymu/small_vlm_checkpoint/`` (package data;
``checkpoints/small_vlm`` in the repository links to it) holds ``projector.safetensors``, ``train_settings.json``
and the DyMU threshold sets ``thresholds/dinov2-small-224-tome-<K>out[-raster].safetensors``, which DyMU names
find (``dinov2-small-224-tome-28out``). Without weights the projector is randomly initialised (seeded).

A projector file carries its prompt format: metadata ``dymu.prompt_suffix`` is the text appended to each question
("" for the committed one: it was trained on the bare question). :func:`build_small_vlm` copies it into the
model's ``dymu`` config block (``prompt_suffix``), so ``save_pretrained`` writes it to ``config.json`` and
``dymu eval``, the lmms-eval plugin and the demo use it (:func:`dymu.vlm.prompt_suffix`).
``save_pretrained`` round-trips through ``LlavaForConditionalGeneration.from_pretrained`` /
``AutoProcessor.from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dymu import weights
from dymu.small_vlm.lora import (
    LORA_PREFIX,
    LoRALinear,
    lora_scales,
    lora_tensors,
    merge_lora,
)

# package data (pyproject.toml), so that an installed dymu has the trained small VLM too
CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "small_vlm_checkpoint"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "projector.safetensors"
# DyMU thresholds found on easy-VQA train images 2000-2511 (docs/results.md): <K>out and <K>out-raster, K = 28/88/176
THRESHOLD_DIR = CHECKPOINT_DIR / "thresholds"
# the mix model's sets (docs/adaptivity.md), package data too; same file names, so their names take a "mix-" prefix
MIX_THRESHOLD_DIR = CHECKPOINT_DIR.parent / "small_vlm_mix_checkpoint" / "thresholds"
PROMPT_SUFFIX_KEY = "dymu.prompt_suffix"  # projector metadata: the text appended to each question
PROJECTOR_PREFIX = "multi_modal_projector."
FILE_FORMAT = "dymu-small-vlm-1"  # projector metadata "format"

IMAGE_TOKEN = "<empty_output>"
IMAGE_SIZE = 224
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256
VISION_FEATURE_LAYER = -1  # last DINOv2 block (before the final layernorm); CLS dropped by "default"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_processor(smol_dir: str | os.PathLike[str]) -> Any:
    # why: transformers' processors take seconds to import (torchvision); only a build needs them
    from transformers import AutoTokenizer, BitImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    image_processor = BitImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_config(dino_dir: str | os.PathLike[str], smol_dir: str | os.PathLike[str], image_token_id: int) -> Any:
    # why: transformers takes seconds to import; only a build needs it
    from transformers import AutoConfig, LlavaConfig

    vision = AutoConfig.from_pretrained(dino_dir)
    text = AutoConfig.from_pretrained(smol_dir)
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        image_seq_length=NUM_IMAGE_TOKENS,
        multimodal_projector_bias=True,
        tie_word_embeddings=text.tie_word_embeddings,
    )


@torch.no_grad()
def load_trained(model: torch.nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load projector weights (``multi_modal_projector.*``) and merge LoRA deltas (``lora.<module>.A/B`` with
    ``lora.<module>.scale``) from a safetensors file into ``model``; returns the file's metadata."""
    projector: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if key.startswith(LORA_PREFIX):
                module, part = key[len(LORA_PREFIX) :].rsplit(".", 1)
                lora.setdefault(module, {})[part] = f.get_tensor(key)
            elif key.startswith(PROJECTOR_PREFIX):
                projector[key[len(PROJECTOR_PREFIX) :]] = f.get_tensor(key)
            else:
                raise ValueError(f"{path}: unexpected tensor {key!r}")
    model.model.multi_modal_projector.load_state_dict(projector)
    merge_lora(model.model.language_model, lora)
    return meta


def trained_tensors(model: torch.nn.Module, adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The trained tensors (CPU copies) as a projector file and the training state key them: the projector's
    ``multi_modal_projector.*``, then each adapter's ``lora.<module>.A`` and ``.B``."""
    state = {f"{PROJECTOR_PREFIX}{k}": v.detach().cpu().clone()
             for k, v in model.model.multi_modal_projector.state_dict().items()}
    state.update(lora_tensors(adapters))
    return state


def save_trained(path: str | os.PathLike[str], model: torch.nn.Module, adapters: dict[str, LoRALinear]) -> None:
    """Write the projector file :func:`load_trained` reads: :func:`trained_tensors` and the adapters' scales, with
    the prompt format it was trained with (the bare question: suffix "") as metadata."""
    tensors = {k: v.contiguous() for k, v in {**trained_tensors(model, adapters), **lora_scales(adapters)}.items()}
    save_file(tensors, str(path), metadata={"format": FILE_FORMAT, PROMPT_SUFFIX_KEY: ""})


def projector_path(projector_weights: str | os.PathLike[str]) -> Path:
    """The projector file ``projector_weights`` names (``"default"``: the shipped one); a missing file is refused
    with what was expected (before any model is built)."""
    if str(projector_weights) == "default":
        if not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the small VLM's trained projector is missing from this dymu installation ({DEFAULT_CHECKPOINT}): "
                "reinstall dymu (its wheel ships dymu/small_vlm_checkpoint/ as package data) or train one with "
                "'dymu train-projector --out DIR' and pass DIR/projector.safetensors"
            )
        return DEFAULT_CHECKPOINT
    path = Path(projector_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"projector weights not found: {path} (expected a projector.safetensors written by 'dymu "
            "train-projector', or 'default' for the shipped one)"
        )
    return path


def threshold_sets() -> list[str]:
    """Names of the small VLM's shipped threshold sets (``dinov2-small-224-tome-28out``, ``...-28out-raster``, ...,
    the mix model's ``mix-dinov2-small-224-tome-28out``, ...)."""
    return sorted([*(p.stem for p in THRESHOLD_DIR.glob("*.safetensors")),
                   *(f"mix-{p.stem}" for p in MIX_THRESHOLD_DIR.glob("*.safetensors"))])


def threshold_path(name: str) -> Path:
    """A shipped threshold set of the small VLM by name: ``"28out"``, ``"28out-raster"`` or the full
    ``"dinov2-small-224-tome-28out[-raster]"``; the mix model's with a ``mix-`` prefix (``"mix-28out"``);
    FileNotFoundError naming the sets there are."""
    mix = name.startswith("mix-")
    folder, base = (MIX_THRESHOLD_DIR, name[4:]) if mix else (THRESHOLD_DIR, name)
    full = base if base.startswith("dinov2-") else f"dinov2-small-224-tome-{base}"
    path = folder / f"{full}.safetensors"
    if not path.is_file():
        known = ", ".join(s for s in threshold_sets() if s.startswith("mix-") == mix)
        known = known or f"none: {folder} is missing, reinstall dymu"
        raise FileNotFoundError(f"the small VLM has no threshold set {name!r}; shipped sets: {known}")
    return path


def prompt_suffix_of(projector_weights: str | os.PathLike[str]) -> str | None:
    """The prompt suffix a projector file records (metadata ``dymu.prompt_suffix``), None if it records none."""
    with safe_open(str(projector_path(projector_weights)), "pt") as f:
        return (f.metadata() or {}).get(PROMPT_SUFFIX_KEY)


def build_small_vlm(
    projector_weights: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Assemble the model and processor from the real weights (built by ``dymu.weights.install`` when absent).

    ``projector_weights``: a safetensors file of the trained projector (and optional LoRA deltas), or
    ``"default"`` for the shipped one (:data:`DEFAULT_CHECKPOINT`); ``None`` keeps the seeded random projector.
    The file's prompt suffix, if it records one, goes to ``model.config.dymu["prompt_suffix"]``.
    Returns ``(model, processor)``, the model in eval mode, fp32.
    """
    # why: the model classes take seconds to import; only a build needs them
    from transformers import (
        Dinov2Model,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
    )

    if projector_weights is not None:  # a missing file is refused before the 30-s build
        projector_weights = projector_path(projector_weights)
    dino_dir = weights.install("dinov2-small", cache_dir=cache_dir, progress=False)
    smol_dir = weights.install("smollm2-135m-instruct", cache_dir=cache_dir, progress=False)
    processor = build_processor(smol_dir)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = build_config(dino_dir, smol_dir, image_token_id)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    dino = Dinov2Model.from_pretrained(dino_dir)
    model.model.vision_tower.load_state_dict(dino.state_dict())
    smol = LlamaForCausalLM.from_pretrained(smol_dir)
    model.model.language_model.load_state_dict(smol.model.state_dict())
    with torch.no_grad():
        model.lm_head.weight.copy_(smol.lm_head.weight)
    model.generation_config.eos_token_id = smol.generation_config.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    del dino, smol
    if projector_weights is not None:
        suffix = load_trained(model, projector_weights).get(PROMPT_SUFFIX_KEY)
        if suffix is not None:  # saved with the model (config.json's "dymu" block), read by dymu.vlm.prompt_suffix
            model.config.dymu = {"prompt_suffix": suffix}
    return model.eval(), processor
