"""Encoder identities and the authors' DyMU encoder names.

An *identity* names an encoder architecture (``ViT-L-14-336``); threshold
checkpoints record it so that thresholds are never applied to another encoder.
Known real shapes get the authors' names; other shapes (tiny test models) get a
descriptive one built from their dimensions, e.g. ``clip-56px-p14-d64``.

A *DyMU name* is an identity plus a token budget, in the authors' naming::

    ViT-L-14-336-tome-72out                 CLIP ViT-L/14-336, 72 patch tokens on average (r_total 504)
    ViT-L-14-336-tome-192out-linear         ... linear schedule
    ViT-L-14-336-tome-480out-reverse-linear ... reverse-linear schedule
    siglip-so400m-patch14-384-256out        SigLIP SO400M/14-384 (26 blocks, as LLaVA-OneVision), r_total 473

``K`` in ``Kout`` counts *patch* tokens (CLS excluded), so ``r_total = patches - K``.
:func:`parse_dymu_name` reads any ``<identity>[-tome]-<K>out[-<schedule>]`` name;
:attr:`DyMUName.checkpoint_path` is where its thresholds are written by default
(``checkpoints/threshold_checkpoints/<name>.safetensors`` under the current folder; the
folder can be moved with the ``DYMU_CHECKPOINT_DIR`` environment variable), and
:meth:`DyMUName.find_checkpoint` looks there first and then among the checkpoints shipped
inside the dymu package (:data:`PACKAGED_CHECKPOINT_DIR`, e.g. the DINOv2-S ones), so a
name resolves outside the repository too.

DINOv2 takes any input size, so its DyMU names carry the input side the thresholds were found at,
``<model identity>-<side>``: ``dinov2-small-224-tome-64out`` (and, for other DINOv2 shapes,
``dinov2-84px-p14-d64-84-tome-16out``); their checkpoints record the model identity (``dinov2-small``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dymu.thresholds import merge_schedule

# (family, image size, patch size, hidden size) -> identity
KNOWN_ENCODERS: dict[tuple[str, int, int, int], str] = {
    ("clip", 336, 14, 1024): "ViT-L-14-336",
    ("siglip", 384, 14, 1152): "siglip-so400m-patch14-384",
    ("dinov2", 518, 14, 384): "dinov2-small",  # ViT-S/14 (any input size: position embeddings interpolate)
}

DEFAULT_CHECKPOINT_DIR = Path("checkpoints") / "threshold_checkpoints"
PACKAGED_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "threshold_checkpoints"
"""Threshold checkpoints installed with dymu (``src/dymu/threshold_checkpoints``, package data)."""


def encoder_identity(family: str, image_size: int | tuple[int, int], patch_size: int | tuple[int, int], hidden_size: int) -> str:
    """The identity of an encoder of ``family`` ("clip": with CLS, "siglip": without) and these dimensions."""
    image_size, patch_size = _side(image_size), _side(patch_size)
    key = (family, image_size, patch_size, int(hidden_size)) if isinstance(image_size, int) and isinstance(patch_size, int) else None
    if key in KNOWN_ENCODERS:
        return KNOWN_ENCODERS[key]
    img = image_size if isinstance(image_size, int) else "x".join(map(str, image_size))
    patch = patch_size if isinstance(patch_size, int) else "x".join(map(str, patch_size))
    return f"{family}-{img}px-p{patch}-d{int(hidden_size)}"


def _side(size: int | tuple[int, int] | list[int]) -> int | tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]) if size[0] == size[1] else (int(size[0]), int(size[1]))
    return int(size)


@dataclass(frozen=True)
class BaseEncoder:
    """An encoder architecture DyMU names can refer to."""

    identity: str
    family: str  # "clip" / "dinov2" (CLS token, protected) or "siglip" (no CLS)
    patch_tokens: int  # tokens per image at the input, CLS excluded
    num_layers: int | None = None  # blocks DyMU runs (SigLIP in LLaVA-OneVision: 26 of 27); None = all
    hf_name: str | None = None  # transformers hub name of the vision model
    open_clip: tuple[str, str] | None = None  # open_clip (model, pretrained tag)
    tome_infix: bool = True  # the authors' names put "-tome" before the count
    model_identity: str | None = None  # what the loaded encoder reports, when not `identity` (DINOv2: no size)
    weights: str | None = None  # default weights as a dymu.weights name (`dymu weights install NAME`)
    image_size: int | None = None  # input side in px the name is for (DINOv2: any input size works)

    @property
    def has_cls(self) -> bool:
        return self.family in ("clip", "dinov2")

    @property
    def encoder(self) -> str:
        """The identity the encoder reports (and its threshold checkpoints record)."""
        return self.model_identity or self.identity


KNOWN_BASES: dict[str, BaseEncoder] = {
    "ViT-L-14-336": BaseEncoder(
        "ViT-L-14-336", "clip", 576, 24, "openai/clip-vit-large-patch14-336", ("ViT-L-14-336", "openai"), True
    ),
    "siglip-so400m-patch14-384": BaseEncoder(
        "siglip-so400m-patch14-384",
        "siglip",
        729,
        26,
        "google/siglip-so400m-patch14-384",
        ("ViT-SO400M-14-SigLIP-384", "webli"),
        False,
    ),
    # DINOv2 takes any input size, so its DyMU names carry the resolution the thresholds were found at
    # ("dinov2-small-224-tome-64out"); their checkpoints record the model identity "dinov2-small".
    # Weights: dymu.weights.install("dinov2-small").
    # Other sizes work too ("dinov2-small-336"), see base_encoder.
    "dinov2-small-224": BaseEncoder(
        "dinov2-small-224", "dinov2", 256, 12, model_identity="dinov2-small", weights="dinov2-small", image_size=224
    ),
    "dinov2-small-448": BaseEncoder(
        "dinov2-small-448", "dinov2", 1024, 12, model_identity="dinov2-small", weights="dinov2-small", image_size=448
    ),
}

# other spellings of the same encoders (open_clip, hub and authors' names) -> identity
ALIASES: dict[str, str] = {
    "ViT-L-14-336-quickgelu": "ViT-L-14-336",
    "openai/clip-vit-large-patch14-336": "ViT-L-14-336",
    "clip-vit-large-patch14-336": "ViT-L-14-336",
    "ViT-SO400M-14-SigLIP-384": "siglip-so400m-patch14-384",
    "google/siglip-so400m-patch14-384": "siglip-so400m-patch14-384",
}

_DINOV2_AT = re.compile(r"^(?P<model>dinov2-small|dinov2-\d+px-p(?P<patch>\d+)-d\d+)-(?P<side>\d+)$")
_GENERIC = re.compile(r"^(?P<family>clip|siglip)-(?P<img>\d+)px-p(?P<patch>\d+)-d(?P<dim>\d+)$")
_DYMU = re.compile(
    r"^(?P<base>.+?)(?P<tome>-tome)?-(?P<k>\d+)out(?:-(?P<schedule>constant|linear|reverse-linear|reverse_linear))?$"
)


def canonical_identity(name: str) -> str:
    """``name`` with aliases resolved (``ViT-SO400M-14-SigLIP-384`` -> ``siglip-so400m-patch14-384``)."""
    name = name.removesuffix("-tome")
    return ALIASES.get(name, name)


def base_encoder(identity: str) -> BaseEncoder:
    """The :class:`BaseEncoder` for a known identity (or alias) or a generic ``<family>-<img>px-p<patch>-d<dim>``."""
    identity = canonical_identity(identity)
    if identity in KNOWN_BASES:
        return KNOWN_BASES[identity]
    m = _DINOV2_AT.match(identity)
    if m is not None:  # DINOv2 at an input side: "dinov2-small-336"
        side, patch = int(m["side"]), int(m["patch"] or 14)
        small = m["model"] == "dinov2-small"
        return BaseEncoder(
            identity, "dinov2", (side // patch) ** 2, 12 if small else None, model_identity=m["model"],
            weights="dinov2-small" if small else None, image_size=side,
        )
    m = _GENERIC.match(identity)
    if m is None:
        known = ", ".join(sorted(KNOWN_BASES))
        hint = " (DINOv2 names carry the input side: dinov2-small-224)" if identity.startswith("dinov2") else ""
        raise ValueError(
            f"unknown encoder {identity!r}; known: {known} (or '<clip|siglip>-<img>px-p<patch>-d<dim>'){hint}"
        )
    img, patch = int(m["img"]), int(m["patch"])
    return BaseEncoder(identity, m["family"], (img // patch) ** 2, tome_infix=True)


@dataclass(frozen=True)
class DyMUName:
    """A parsed DyMU encoder name: base encoder + average output tokens + schedule."""

    name: str
    base: BaseEncoder
    out_tokens: int  # patch tokens kept on average (CLS excluded)
    schedule: str = "constant"

    @property
    def hf_name(self) -> str | None:
        """transformers hub name of the base encoder (None for generic identities)."""
        return self.base.hf_name

    @property
    def r_total(self) -> int:
        """Tokens merged over all layers during threshold finding."""
        return self.base.patch_tokens - self.out_tokens

    def merge_counts(self, num_layers: int | None = None) -> list[int]:
        """Per-layer merge counts for finding (``num_layers`` defaults to the base's)."""
        layers = num_layers or self.base.num_layers
        if layers is None:
            raise ValueError(f"{self.name}: the number of layers is not known from the name; pass num_layers")
        return merge_schedule(self.schedule, self.r_total, layers)

    @property
    def checkpoint_path(self) -> Path:
        """Default threshold checkpoint: ``<DYMU_CHECKPOINT_DIR or checkpoints/threshold_checkpoints>/<name>.safetensors``."""
        return checkpoint_dir() / f"{self.name}.safetensors"

    def find_checkpoint(self) -> Path:
        """The existing checkpoint of this name (``.safetensors``, else the authors' ``.pth``) in
        :func:`checkpoint_dir`, else among the checkpoints shipped with dymu; FileNotFoundError if none."""
        for folder in dict.fromkeys((checkpoint_dir(), PACKAGED_CHECKPOINT_DIR)):
            for suffix in (".safetensors", ".pth"):
                path = folder / f"{self.name}{suffix}"
                if path.is_file():
                    return path
        raise FileNotFoundError(
            f"no thresholds for {self.name} at {self.checkpoint_path} (or .pth; the folder is $DYMU_CHECKPOINT_DIR "
            f"if set, else ./{DEFAULT_CHECKPOINT_DIR}) nor among dymu's own: run "
            f"'dymu thresholds --model {self.name} --data IMAGES.json --image-dir DIR' or put the authors' "
            f"checkpoint there"
        )


def checkpoint_dir() -> Path:
    return Path(os.environ.get("DYMU_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_DIR))


def is_dymu_name(name: str) -> bool:
    """True if ``name`` looks like ``<encoder>[-tome]-<K>out[-schedule]`` (the encoder is not checked)."""
    return isinstance(name, str) and "/" not in name and _DYMU.match(name) is not None


def parse_dymu_name(name: str) -> DyMUName:
    """Parse ``<identity>[-tome]-<K>out[-linear|-reverse-linear]``; ValueError if malformed or unknown."""
    m = _DYMU.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"{name!r} is not a DyMU encoder name; expected '<encoder>[-tome]-<K>out[-linear|-reverse-linear]', "
            "e.g. ViT-L-14-336-tome-72out or siglip-so400m-patch14-384-256out"
        )
    base = base_encoder(m["base"])
    k = int(m["k"])
    if not 0 < k <= base.patch_tokens:
        raise ValueError(f"{name}: {k} output tokens is out of range for {base.identity} (1..{base.patch_tokens})")
    schedule = (m["schedule"] or "constant").replace("-", "_")
    return DyMUName(name, base, k, schedule)


def dymu_name(identity: str, out_tokens: int, schedule: str = "constant", image_size: int | None = None) -> str:
    """The DyMU name of ``identity`` at ``out_tokens`` in the authors' style (inverse of :func:`parse_dymu_name`).

    A DINOv2 model identity (``dinov2-small``) needs the input side, ``image_size``: ``dinov2-small-224-tome-64out``.
    """
    if identity.startswith("dinov2-") and identity not in KNOWN_BASES and not _DINOV2_AT.match(identity):
        if image_size is None:
            raise ValueError(f"a DyMU name of the DINOv2 encoder {identity!r} needs the input side (image_size)")
        identity = f"{identity}-{int(image_size)}"
    base = base_encoder(identity)
    suffix = "" if schedule in ("constant", "") else "-" + schedule.replace("_", "-")
    infix = "-tome" if base.tome_infix else ""
    return f"{base.identity}{infix}-{int(out_tokens)}out{suffix}"
