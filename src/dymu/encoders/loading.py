"""Load a vision encoder and its preprocessing from the ways users name one (used by ``dymu thresholds`` and
``dymu encode``):

* a local transformers folder or a hub name of a CLIP / SigLIP (vision) model or a DINOv2 ``Dinov2Model`` —
  ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model.from_pretrained`` and ``AutoImageProcessor`` from the
  same place; an installed :mod:`dymu.weights` name (``dinov2-small``) stands for its folder;
* ``open_clip:MODEL[:PRETRAINED]`` — ``open_clip.create_model_and_transforms`` (``MODEL`` may be
  ``local-dir:/path`` or ``hf-hub:org/repo``; ``PRETRAINED`` a tag or a file); only ``model.visual`` is kept;
* a DyMU name (``ViT-L-14-336-tome-72out``) — its base encoder from the hub (or from ``weights``), cut to the
  number of blocks the name is for (SigLIP: 26, as in LLaVA-OneVision). A DINOv2 name
  (``dinov2-small-224-tome-64out``) loads the installed ``dinov2-small`` weights.

One encoder identity, one preprocessing: a DINOv2 (which takes any input size) always gets its processor
squashing every image to the input side with no crop (:func:`dymu.data.squash_transform`) — the side of its DyMU
name, else the processor's crop size (224 for ``dinov2-small``, whose stock processor would resize to 256 and
centre-crop 224). That is what the small VLM's processor does, so thresholds found with ``--model dinov2-small``
and with ``--model dinov2-small-224-tome-64out`` are the same and fit the VLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from dymu import weights as dymu_weights
from dymu.data import hf_transform, size_entry, squash_transform
from dymu.encoders.names import (
    KNOWN_BASES,
    DyMUName,
    bare_encoder_error,
    did_you_mean,
    is_dymu_name,
    known_dymu_names,
    parse_dymu_name,
)
from dymu.encoders.patching import inspect_encoder
from dymu.hub import explain, is_hub_name


@dataclass
class LoadedEncoder:
    model: nn.Module
    preprocess: Callable[[object], Tensor]  # PIL image -> [3, H, W]
    source: str  # what was loaded, for messages and resume checks
    dymu: DyMUName | None = None
    image_size: int | None = None  # input side the preprocessing makes (square), when known


def load_encoder(
    spec: str,
    *,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedEncoder:
    """Load the encoder named by ``spec`` (see module doc) in eval mode on ``device``."""
    dymu = None
    if is_dymu_name(spec) and not Path(spec).exists():
        dymu = parse_dymu_name(spec)
        source = weights or dymu.base.hf_name or dymu.base.weights
        if source is None:
            raise ValueError(f"{spec}: no default weights for {dymu.base.identity}; pass the encoder with --weights")
        if is_dymu_name(source) and not Path(source).exists():
            raise ValueError(f"weights {source!r} must be a model folder, hub name or open_clip:..., not a DyMU name")
        hint = f"or pass a local copy of {source} with --weights FOLDER (library: load_encoder(name, weights=FOLDER))"
        loaded = _load(source, num_layers=dymu.base.num_layers, hint=hint, side=dymu.base.image_size)
        loaded.dymu = dymu
    elif spec.endswith("-tome") and not Path(spec).exists() and (bare := bare_encoder_error(spec)) is not None:
        raise bare  # the authors' OneVision spelling of the tower, without the count
    elif weights is not None:
        raise ValueError("--weights is only used with a DyMU name as --model")
    else:
        loaded = _load(spec)
    loaded.model.to(device=device, dtype=dtype).eval()
    if dymu is not None:
        state = inspect_encoder(loaded.model)
        identity, layers = state.encoder, state.num_layers
        if identity != dymu.base.encoder:
            raise ValueError(f"{loaded.source} is a {identity} encoder, but {spec} is for {dymu.base.encoder}")
        if dymu.base.num_layers is not None and layers != dymu.base.num_layers:
            raise ValueError(f"{spec} is for {dymu.base.num_layers} blocks but {loaded.source} has {layers}")
    return loaded


def _load(
    spec: str, *, num_layers: int | None = None, hint: str | None = None, side: int | None = None
) -> LoadedEncoder:
    if spec.startswith("open_clip:"):
        return _load_open_clip(spec.removeprefix("open_clip:"), num_layers)
    return _load_hf(spec, num_layers, hint or "or pass a local folder of the model (--model FOLDER)", side)


def _load_hf(spec: str, num_layers: int | None, hint: str, side: int | None = None) -> LoadedEncoder:
    # why: transformers' model modules take seconds to import; loaded with a model only
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, Dinov2Model, SiglipVisionModel

    if spec in dymu_weights.REGISTRY:  # an installed weights name (FileNotFoundError says how to install it)
        spec = str(dymu_weights.resolve(spec))
    local = Path(spec)
    if not local.is_dir() and not is_hub_name(spec):
        known = [*dymu_weights.REGISTRY, *known_dymu_names(), *(b.hf_name for b in KNOWN_BASES.values() if b.hf_name)]
        raise FileNotFoundError(
            f"model folder not found: {local.absolute()}{did_you_mean(spec, known)} (nor is it a hub name "
            "'org/model', a weights name or a DyMU name)"
        )
    with explain(spec, what=f"cannot load the encoder {spec}", local_hint=hint):  # a hub name: say how to get it
        try:
            config = AutoConfig.from_pretrained(spec)
        except OSError as err:
            if is_hub_name(spec):
                raise  # explain says it
            raise FileNotFoundError(f"cannot load a transformers config from {spec}: {err}") from err
    kind = config.model_type
    classes = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel}
    classes |= {"siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel, "dinov2": Dinov2Model}
    if kind not in classes:
        raise ValueError(
            f"{spec} is a {kind!r} model; dymu loads CLIP/SigLIP vision models and DINOv2 (Dinov2Model) from "
            "transformers folders (for a LLaVA checkpoint, pass its vision tower, e.g. openai/clip-vit-large-patch14-336)"
        )
    kwargs = {"attn_implementation": "sdpa"} if kind == "dinov2" else {}  # DToMe needs an additive attention bias
    if num_layers is not None:
        # e.g. LLaVA-OneVision runs 26 of SigLIP-SO400M's 27 blocks: load only those
        vision = getattr(config, "vision_config", config)
        if vision.num_hidden_layers > num_layers:
            kwargs["num_hidden_layers"] = num_layers
    with explain(spec, what=f"cannot load the encoder {spec}", local_hint=hint):
        try:
            model = classes[kind].from_pretrained(spec, **kwargs)
            processor = AutoImageProcessor.from_pretrained(spec)
        except OSError as err:
            if is_hub_name(spec):
                raise
            raise FileNotFoundError(f"cannot load {spec}: {err}") from err
    # a folder is recorded by its absolute path, so a resumed run may name it differently
    source = str(local.resolve()) if local.is_dir() else spec
    if kind == "dinov2":  # any input size: one preprocessing per side (module doc)
        side = side or _crop_side(processor)
        return LoadedEncoder(model, squash_transform(processor, side), source, image_size=side)
    size = getattr(getattr(model.config, "vision_config", model.config), "image_size", None)
    return LoadedEncoder(model, hf_transform(processor), source, image_size=size)


def _crop_side(processor) -> int:
    """The side a DINOv2 processor's stock pipeline ends at (its crop size; 224 for dinov2-small)."""
    for size in (getattr(processor, "crop_size", None), getattr(processor, "size", None)):
        side = size_entry(size, "height") if size is not None else None
        if side:
            return side
    raise ValueError(f"cannot tell the input side from {type(processor).__name__}; use a DyMU name with the side")


def _load_open_clip(spec: str, num_layers: int | None) -> LoadedEncoder:
    try:
        import open_clip
    except ImportError as err:
        raise ValueError("open_clip models need open_clip_torch: pip install 'dymu[openclip]'") from err
    if spec.startswith(("local-dir:", "hf-hub:")):
        name, pretrained = spec, None
    else:
        name, _, pretrained = spec.partition(":")
        pretrained = pretrained or None
    if not name:
        raise ValueError("open_clip model name missing: use open_clip:MODEL[:PRETRAINED]")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except RuntimeError as err:  # open_clip reports unknown names / tags this way
        raise ValueError(f"open_clip cannot create {spec!r}: {err}") from err
    visual = model.visual  # the text tower is not needed
    del model
    if num_layers is not None:
        _truncate_open_clip(visual, num_layers)
    return LoadedEncoder(visual, preprocess, f"open_clip:{spec}")


def _truncate_open_clip(visual: nn.Module, num_layers: int) -> None:
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        if len(trunk.blocks) > num_layers:
            trunk.blocks = trunk.blocks[:num_layers]
    elif hasattr(visual, "transformer") and len(visual.transformer.resblocks) > num_layers:
        visual.transformer.resblocks = visual.transformer.resblocks[:num_layers]
