"""Running threshold statistics and threshold checkpoints (merge schedules: :mod:`dymu.schedules`, also
importable from here).

A threshold checkpoint is a small safetensors file::

    thresholds    float32 [L]   per-layer threshold (+inf = never merge at that layer)
    merge_counts  int64   [L]   the schedule's merge count per layer used while finding

with string metadata ``format=dymu-thresholds``, ``encoder``, ``num_layers``,
``schedule``, ``r_total``, ``images_seen`` and ``token_order`` (the token order
after a merge used while finding, see :mod:`dymu.merge`: ``authors`` or
``raster``; files written before it was recorded were found in raster order), and,
when known, what decides the token grid and the pixels: ``input_size`` (``"224x224"``,
height x width in px), ``patch_size`` (``"14"``) and ``preprocess`` (how images were
brought to that size, :func:`dymu.data.describe_preprocess`: ``"squash 224x224 bicubic"``).
The encoder identity of a DINOv2 (``dinov2-small``) does not fix its input size, so the
grid must be checked on its own: a checkpoint whose grid differs from the input's is refused
(:meth:`ThresholdCheckpoint.check`, and the patched encoder at its first block). Files written
before the grid was recorded read it from their file name when that is a DINOv2 DyMU name
(``dinov2-small-224-tome-64out``: 224 px, patch 14); otherwise it stays unknown and only the
encoder identity and layer count are checked. The
original DyMU authors' ``.pth`` files (``{"state_dict": {"...blocks.{i}.threshold":
tensor}}``) are read by :func:`import_authors_pth` and by :func:`load_thresholds`.

Thresholds are cosine similarities: each must be in [-1, 1], or +inf (never merge
at that layer; a threshold >= 1 merges nothing either, which is how the authors'
files mark layers whose schedule merged nothing).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from dymu.distributed import all_reduce_mean
from dymu.encoders.names import is_dymu_name, parse_dymu_name
from dymu.schedules import SCHEDULES, Schedule, merge_schedule  # noqa: F401  (importable from here, as before)

FORMAT = "dymu-thresholds"


ROUNDING = 1e-5
"""How far past ±1 a recorded cosine may lie (float32 rounding of a normalised dot product)."""


def check_thresholds(values: Tensor, where: str = "thresholds") -> Tensor:
    """``values`` as float32 ``[L]``; ValueError naming the layer if one is NaN, -inf or outside [-1, 1] (+inf is
    allowed: never merge). Up to :data:`ROUNDING` past ±1 is accepted: finding on identical tokens records their
    cosine, which float rounding can put just above 1 (a threshold >= 1 merges nothing either way)."""
    values = torch.as_tensor(values, dtype=torch.float32).flatten()
    bad = torch.isnan(values) | (values < -1 - ROUNDING) | ((values > 1 + ROUNDING) & ~torch.isposinf(values))
    if bool(bad.any()):
        layer = int(torch.nonzero(bad)[0])
        value = float(values[layer])
        raise ValueError(
            f"{where}: layer {layer} has threshold {'NaN' if math.isnan(value) else value}; expected a cosine "
            "similarity in [-1, 1] or +inf (never merge)"
        )
    return values


def finding_order(order: str) -> str:
    """The order a threshold set was found in, as recorded: ``raster`` or ``authors`` (batch/single find the same)."""
    return "raster" if order == "raster" else "authors"


class RunningThresholds:
    """Cumulative mean of per-layer thresholds over batches; the first update replaces the initial values, as in
    the authors' code.

    ``average_over_processes``: with ``torch.distributed`` initialised, each update first averages the
    processes' values (all-reduce mean: the authors' per-process finding). :func:`dymu.finding.find_thresholds`
    turns it off: its selection across processes already gives every process the same values.
    """

    def __init__(self, num_layers: int, *, average_over_processes: bool = True) -> None:
        self.mean = torch.zeros(num_layers, dtype=torch.float64)
        self.batches = 0
        self.average_over_processes = average_over_processes

    def update(self, values: Sequence[float] | Tensor) -> Tensor:
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
        if v.shape != self.mean.shape:
            raise ValueError(f"expected {self.mean.numel()} per-layer thresholds, got {v.numel()}")
        if bool(torch.isnan(v).any()):
            raise ValueError(f"NaN threshold in update: {v.tolist()}")
        if self.average_over_processes:
            v = all_reduce_mean(v)
        self.batches += 1
        self.mean += (v - self.mean) / self.batches
        return self.mean

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"mean": self.mean.clone(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        if mean.shape != self.mean.shape:
            raise ValueError(f"resume state has {mean.numel()} layers, expected {self.mean.numel()}")
        self.mean, self.batches = mean.clone(), int(state["batches"])


@dataclass
class ThresholdCheckpoint:
    """Per-layer thresholds of one encoder, with how they were found."""

    thresholds: Tensor  # float32 [L]
    encoder: str
    schedule: str = "constant"
    r_total: int = 0
    merge_counts: list[int] = field(default_factory=list)
    images_seen: int = 0
    token_order: str = "authors"  # order used while finding: "authors" or "raster" (see dymu.merge)
    input_size: tuple[int, int] | None = None  # (height, width) px of the images found on; None: not recorded
    patch_size: int | None = None  # px per patch side; None: not recorded
    preprocess: str | None = None  # how images were brought to input_size (dymu.data.describe_preprocess)

    def __post_init__(self) -> None:
        self.thresholds = check_thresholds(self.thresholds, f"thresholds for {self.encoder or 'an unknown encoder'!r}")
        self.token_order = finding_order(self.token_order)
        if self.merge_counts and len(self.merge_counts) != self.num_layers:
            raise ValueError(
                f"{len(self.merge_counts)} merge counts for {self.num_layers} layers in checkpoint of {self.encoder!r}"
            )

    @property
    def num_layers(self) -> int:
        return self.thresholds.numel()

    @property
    def grid_tokens(self) -> int | None:
        """Patch tokens per image (CLS excluded) of the inputs the thresholds were found on; None if not recorded."""
        if self.input_size is None or self.patch_size is None:
            return None
        return (self.input_size[0] // self.patch_size) * (self.input_size[1] // self.patch_size)

    @property
    def grid(self) -> str:
        """The recorded input in words, for messages: ``"224x224 px (16x16 patches of 14 px)"``."""
        if self.input_size is None:
            return "an unrecorded input size"
        h, w = self.input_size
        if self.patch_size is None:
            return f"{h}x{w} px"
        return f"{h}x{w} px ({h // self.patch_size}x{w // self.patch_size} patches of {self.patch_size} px)"

    def check(
        self,
        *,
        encoder: str | None = None,
        num_layers: int | None = None,
        input_size: int | tuple[int, int] | None = None,
    ) -> "ThresholdCheckpoint":
        """Raise if this checkpoint is not for ``encoder`` / a model of ``num_layers`` blocks / inputs of
        ``input_size`` px (a side or (height, width); checked only when the checkpoint records its own)."""
        if encoder is not None and encoder != self.encoder:
            raise ValueError(f"thresholds are for encoder {self.encoder!r}, not {encoder!r}")
        if num_layers is not None and num_layers != self.num_layers:
            raise ValueError(
                f"thresholds for {self.encoder!r} have {self.num_layers} layers but the model has {num_layers}"
            )
        if input_size is not None and self.input_size is not None:
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
            if size != self.input_size:
                raise ValueError(
                    f"thresholds for {self.encoder!r} were found on {self.grid} inputs, but this encoder gets "
                    f"{size[0]}x{size[1]} px: another token grid gives other token counts (find thresholds at "
                    "this size, or use the checkpoint's)"
                )
        return self


def save_thresholds(path: str | Path, ckpt: ThresholdCheckpoint) -> Path:
    """Write ``ckpt`` as safetensors (parent folders are created), with the mode the umask gives (0644 under 022,
    like every other file: safetensors' ``save_file`` would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"thresholds": ckpt.thresholds.contiguous()}
    if ckpt.merge_counts:
        tensors["merge_counts"] = torch.tensor(ckpt.merge_counts, dtype=torch.int64)
    metadata = {
        "format": FORMAT,
        "encoder": ckpt.encoder,
        "num_layers": str(ckpt.num_layers),
        "schedule": ckpt.schedule,
        "r_total": str(ckpt.r_total),
        "images_seen": str(ckpt.images_seen),
        "token_order": ckpt.token_order,
    }
    if ckpt.input_size is not None:
        metadata["input_size"] = f"{ckpt.input_size[0]}x{ckpt.input_size[1]}"
    if ckpt.patch_size is not None:
        metadata["patch_size"] = str(ckpt.patch_size)
    if ckpt.preprocess:
        metadata["preprocess"] = ckpt.preprocess
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # open() honours the umask
        f.write(save(tensors, metadata=metadata))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)  # atomic: a killed run never leaves half a checkpoint
    return path


def load_thresholds(
    path: str | Path,
    *,
    encoder: str | None = None,
    num_layers: int | None = None,
    input_size: int | tuple[int, int] | None = None,
) -> ThresholdCheckpoint:
    """Read a dymu safetensors checkpoint or an authors' ``.pth`` file, checking it fits (see
    :meth:`ThresholdCheckpoint.check`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"threshold checkpoint not found: {path}")
    if _is_torch_file(path):  # by content, not by name: the authors' .pth (zip or legacy pickle)
        return import_authors_pth(path).check(encoder=encoder, num_layers=num_layers, input_size=input_size)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors threshold checkpoint: {err}") from err
    if meta.get("format") != FORMAT or "thresholds" not in tensors:
        raise ValueError(f"{path} is not a dymu threshold checkpoint (metadata format={meta.get('format')!r})")
    ckpt = ThresholdCheckpoint(
        thresholds=tensors["thresholds"],
        encoder=meta.get("encoder", ""),
        schedule=meta.get("schedule", "constant"),
        r_total=int(meta.get("r_total", 0)),
        merge_counts=tensors["merge_counts"].tolist() if "merge_counts" in tensors else [],
        images_seen=int(meta.get("images_seen", 0)),
        token_order=meta.get("token_order", "raster"),  # before it was recorded, dymu found in raster order
        preprocess=meta.get("preprocess") or None,
    )
    if int(meta.get("num_layers", ckpt.num_layers)) != ckpt.num_layers:
        raise ValueError(f"{path}: metadata says {meta['num_layers']} layers, tensor has {ckpt.num_layers}")
    try:
        if "input_size" in meta:
            h, _, w = meta["input_size"].partition("x")
            ckpt.input_size = (int(h), int(w))
        if "patch_size" in meta:
            ckpt.patch_size = int(meta["patch_size"])
    except ValueError:
        raise ValueError(
            f"{path}: metadata input_size={meta.get('input_size')!r} / patch_size={meta.get('patch_size')!r}; "
            "expected '<height>x<width>' and an integer"
        ) from None
    if ckpt.input_size is None:  # written before the grid was recorded: a DINOv2 name says it
        ckpt.input_size, ckpt.patch_size = _grid_from_name(path.stem, ckpt.encoder)
    return ckpt.check(encoder=encoder, num_layers=num_layers, input_size=input_size)


def _grid_from_name(stem: str, encoder: str) -> tuple[tuple[int, int] | None, int | None]:
    """((side, side), patch) from a DINOv2 DyMU file name of ``encoder`` (``dinov2-small-224-tome-64out``), else
    (None, None). Only DINOv2 names carry a side that the encoder identity does not."""

    if not is_dymu_name(stem):
        return None, None
    try:
        base = parse_dymu_name(stem).base
    except ValueError:
        return None, None
    if base.image_size is None or base.encoder != encoder:
        return None, None
    side = base.image_size
    return (side, side), round((side * side / base.patch_tokens) ** 0.5)


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header (its length may start with 0x80)
    if len(head) == 9 and head[8:] == b"{" and 8 < int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size:
        return False
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"  # torch.save: zip archive, or a legacy pickle


_BLOCK_INDEX = re.compile(r"(\d+)\.threshold$")
# "<identity>[-tome]-<K>out[-schedule]": the authors name files after the DyMU encoder
_NAME_SUFFIX = re.compile(r"(?:-tome)?-\d+out(?:-(?:constant|linear|reverse[-_]linear))?$")


def import_authors_pth(path: str | Path, *, encoder: str | None = None) -> ThresholdCheckpoint:
    """Read the original DyMU ``.pth`` format.

    A torch-saved dict with ``state_dict`` (keys possibly prefixed ``module.``)
    whose keys ending in ``.threshold`` hold one value per block, e.g.
    ``visual.transformer.resblocks.{i}.threshold`` (CLIP) or
    ``vision_model.encoder.layers.{i}.threshold`` (SigLIP).

    The encoder identity comes from ``encoder``, else the file's ``name`` entry, else a
    file name in the authors' style (``ViT-L-14-336-tome-72out.pth``); a renamed file
    gets an empty identity (unknown: only its layer count is checked when used).
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot read {path} as an authors' threshold file (a torch-saved dict with a 'state_dict'): "
            f"{type(err).__name__}"
        ) from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict', got {type(blob).__name__}")
    by_layer: dict[int, float] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = _BLOCK_INDEX.search(key)
        if match is None:
            continue
        layer = int(match.group(1))
        if layer in by_layer:
            raise ValueError(f"{path}: two '.threshold' entries for block {layer}")
        value = torch.as_tensor(value)
        if value.numel() != 1:
            raise ValueError(
                f"{path}: {key} holds {value.numel()} values {tuple(value.shape)}; expected one threshold per block"
            )
        by_layer[layer] = float(value)
    if not by_layer:
        raise ValueError(f"{path}: no keys ending in '<block>.threshold' in its state_dict")
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ValueError(f"{path}: threshold blocks are not numbered 0..{len(by_layer) - 1}: {sorted(by_layer)}")
    name = encoder
    if name is None and isinstance(blob, dict) and isinstance(blob.get("name"), str):
        name = blob["name"]
    if name is None and _NAME_SUFFIX.search(path.stem):
        name = path.stem
    identity = _NAME_SUFFIX.sub("", name or "")
    return ThresholdCheckpoint(
        thresholds=torch.tensor([by_layer[i] for i in range(len(by_layer))]),
        encoder=identity,
        schedule="unknown",
        token_order="authors",
    )
