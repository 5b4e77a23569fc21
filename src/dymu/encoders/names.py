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
:meth:`DyMUName.find_checkpoint` looks there first, then among the checkpoints shipped
inside the dymu package (:data:`PACKAGED_CHECKPOINT_DIRS`: the DINOv2-S ones, then the small VLM's
sets), so a name resolves outside the repository too, and last in the authors' hub repository
(:func:`hub_checkpoint`: ``DYMU_HUB_REPO``, default ``mikewang/DyMU``, for the authors' encoders; file
layout ``DYMU_HUB_FILES``, default ``{name}.pth,threshold_checkpoints/{name}.pth``), cached by huggingface_hub.

DINOv2 takes any input size, so its DyMU names carry the input side the thresholds were found at,
``<model identity>-<side>``: ``dinov2-small-224-tome-64out`` (and, for other DINOv2 shapes,
``dinov2-84px-p14-d64-84-tome-16out``); their checkpoints record the model identity (``dinov2-small``) and, apart,
the input size and patch size (:mod:`dymu.thresholds`), so thresholds are never used on another token grid.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dymu.hub import find_hub_file
from dymu.schedules import merge_schedule

# (family, image size, patch size, hidden size) -> identity
KNOWN_ENCODERS: dict[tuple[str, int, int, int], str] = {
    ("clip", 336, 14, 1024): "ViT-L-14-336",
    ("siglip", 384, 14, 1152): "siglip-so400m-patch14-384",
    ("dinov2", 518, 14, 384): "dinov2-small",  # ViT-S/14 (any input size: position embeddings interpolate)
}

DEFAULT_CHECKPOINT_DIR = Path("checkpoints") / "threshold_checkpoints"
PACKAGED_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "threshold_checkpoints"
"""Threshold checkpoints installed with dymu (``src/dymu/threshold_checkpoints``, package data)."""
PACKAGED_CHECKPOINT_DIRS = (PACKAGED_CHECKPOINT_DIR, PACKAGED_CHECKPOINT_DIR.parent / "small_vlm_checkpoint" / "thresholds")
"""Every folder of shipped threshold checkpoints: the general ones, then the small VLM's (:mod:`dymu.small_vlm`)."""


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
    # ("dinov2-small-224-tome-64out"); their checkpoints record the model identity "dinov2-small" and the input size.
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

_QWEN_PCT = re.compile(r"^(?P<base>qwen\w*vl-p\d+-d\d+-l\d+)-tome-(?P<p>\d+)pct$")


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
            f"unknown encoder {identity!r}{did_you_mean(identity, [*KNOWN_BASES, *ALIASES], 0.6)}; known: {known} "
            f"(or '<clip|siglip>-<img>px-p<patch>-d<dim>'){hint}"
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
        for folder in dict.fromkeys((checkpoint_dir(), *PACKAGED_CHECKPOINT_DIRS)):
            for suffix in (".safetensors", ".pth"):
                path = folder / f"{self.name}{suffix}"
                if path.is_file():
                    return path
        missing = (
            f"no thresholds for {self.name} at {self.checkpoint_path} (or .pth; the folder is $DYMU_CHECKPOINT_DIR "
            f"if set, else ./{DEFAULT_CHECKPOINT_DIR}) nor among dymu's own"
        )
        fix = (
            f"run 'dymu thresholds --model {self.name} --data IMAGES.json --image-dir DIR', put the authors' "
            f"checkpoint at {checkpoint_dir() / self.name}.pth, or pass a thresholds file"
        )
        found, tried = hub_checkpoint(self, what=missing, local_hint=fix)
        if found is not None:
            return found
        near = did_you_mean(self.name, [n for n in known_dymu_names() if n != self.name])
        raise FileNotFoundError(f"{missing}{tried}{near}: {fix}")

    @property
    def authors_spelling(self) -> str:
        """The name as the authors spell their files (``-tome`` before the count for every encoder)."""
        suffix = "" if self.schedule == "constant" else "-" + self.schedule.replace("_", "-")
        return f"{self.base.identity}-tome-{self.out_tokens}out{suffix}"


def checkpoint_dir() -> Path:
    return Path(os.environ.get("DYMU_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_DIR))


AUTHORS_HUB_REPO = "mikewang/DyMU"
"""The authors' hub repository of threshold checkpoints (its file layout is not verified here: configurable)."""
AUTHORS_HUB_FILES = ("{name}.pth", "threshold_checkpoints/{name}.pth")
"""Where a name's ``.pth`` may sit in that repository; the first found wins."""
AUTHORS_ENCODERS = ("ViT-L-14-336", "siglip-so400m-patch14-384")
"""Encoders the authors published thresholds for: only their names are looked up in the default repository."""
AUTHORS_NAMES = tuple(f"ViT-L-14-336-tome-{k}out" for k in (72, 192, 384, 480)) + tuple(
    f"siglip-so400m-patch14-384-tome-{k}out" for k in (81, 162, 324)
)
"""The authors' names for their published thresholds (for suggestions; the hub decides what exists)."""


def hub_checkpoint(name: DyMUName, *, what: str, local_hint: str) -> tuple[Path | None, str]:
    """The thresholds of ``name`` from the hub repository ``$DYMU_HUB_REPO`` (default :data:`AUTHORS_HUB_REPO`,
    consulted for the authors' encoders only; an explicit repository for every name; empty: never), at the
    first of ``$DYMU_HUB_FILES`` (comma-separated, ``{name}`` replaced by the name as given and as the authors
    spell it; default :data:`AUTHORS_HUB_FILES`). Returns (path or None, a note on what was tried)."""
    repo = os.environ.get("DYMU_HUB_REPO")
    if repo is None:
        repo = AUTHORS_HUB_REPO if name.base.identity in AUTHORS_ENCODERS else ""
    if not repo.strip():
        return None, ""
    patterns = [p.strip() for p in os.environ.get("DYMU_HUB_FILES", ",".join(AUTHORS_HUB_FILES)).split(",") if p.strip()]
    spellings = dict.fromkeys((name.name, name.authors_spelling))
    files = list(dict.fromkeys(p.format(name=n) for p in patterns for n in spellings))
    found = find_hub_file(repo.strip(), files, what=what, local_hint=local_hint)
    return found, f", nor in hub repository {repo.strip()!r} ({', '.join(files)}; $DYMU_HUB_REPO, $DYMU_HUB_FILES)"


def known_dymu_names() -> list[str]:
    """DyMU names with a checkpoint here (checkpoint folder, dymu's own) and the authors' published ones."""
    found = [
        p.stem for folder in dict.fromkeys((checkpoint_dir(), *PACKAGED_CHECKPOINT_DIRS)) if folder.is_dir()
        for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".pth") and is_dymu_name(p.stem)
    ]
    return list(dict.fromkeys([*found, *AUTHORS_NAMES]))


def did_you_mean(text: str, candidates: list[str], cutoff: float = 0.8) -> str:
    """`` (did you mean A or B?)`` for the candidates closest to ``text`` (difflib), else ''."""
    close = difflib.get_close_matches(text, candidates, n=3, cutoff=cutoff)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def bare_encoder_error(text: str) -> ValueError | None:
    """The error for an encoder named without a token count where thresholds are needed (the authors' OneVision
    spelling ``ViT-SO400M-14-SigLIP-384-tome``), else None."""
    identity = canonical_identity(text)
    if "/" in text or identity not in KNOWN_BASES:
        return None
    base = KNOWN_BASES[identity]
    example = dymu_name(identity, {"ViT-L-14-336": 72, "siglip-so400m-patch14-384": 81}.get(identity, base.patch_tokens // 4))
    return ValueError(
        f"{text!r} names the encoder {identity} without a token count, so it says nothing about thresholds: give "
        f"a DyMU name with the count K of patch tokens kept on average (e.g. {example}) or a thresholds file "
        "(.safetensors, or the authors' .pth)"
    )


def thresholds_not_found(text: str) -> Exception:
    """The error for a thresholds argument that is neither a file nor a DyMU name: a bare encoder name, a typo
    of a known DyMU name (suggested), or a missing file."""
    bare = bare_encoder_error(text)
    if bare is not None:
        return bare
    return FileNotFoundError(
        f"threshold checkpoint not found: {Path(text).absolute()}{did_you_mean(Path(text).name, known_dymu_names())} "
        "(expected a .safetensors / .pth file or a DyMU name such as ViT-L-14-336-tome-72out)"
    )


def is_dymu_name(name: str) -> bool:
    """True if ``name`` looks like ``<encoder>[-tome]-<K>out[-schedule]`` (the encoder is not checked)."""
    return isinstance(name, str) and "/" not in name and _DYMU.match(name) is not None


def parse_dymu_name(name: str) -> DyMUName:
    """Parse ``<identity>[-tome]-<K>out[-linear|-reverse-linear]``; ValueError if malformed or unknown."""
    if isinstance(name, str) and _QWEN_PCT.match(name):  # no fixed patch count: the name cannot give a budget
        raise ValueError(
            f"{name!r} names Qwen-VL tower thresholds (share of cells kept on the finding images, docs/qwen_vl.md), "
            f"not an encoder budget: pass the checkpoint file instead, e.g. {checkpoint_dir() / (name + '.safetensors')}"
        )
    m = _DYMU.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"{name!r} is not a DyMU encoder name; expected '<encoder>[-tome]-<K>out[-linear|-reverse-linear]', "
            "e.g. ViT-L-14-336-tome-72out or siglip-so400m-patch14-384-256out"
        )
    try:
        base = base_encoder(m["base"])
    except ValueError:  # suggest whole names: "ViT-L-14-363-tome-72out" -> "ViT-L-14-336-tome-72out"
        rest = name[len(m["base"]) :]
        close = difflib.get_close_matches(m["base"], [*KNOWN_BASES, *ALIASES], n=3, cutoff=0.6)
        if not close:
            raise
        known = ", ".join(sorted(KNOWN_BASES))
        raise ValueError(
            f"{name}: unknown encoder {m['base']!r}; did you mean {' or '.join(c + rest for c in close)}? "
            f"(known encoders: {known})"
        ) from None
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
