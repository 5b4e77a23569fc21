"""Image complexity vs tokens kept: JPEG bytes per pixel (quality 75, in memory, on the model's input view)
against the visual tokens a patched tower keeps, with their Spearman rank correlation."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

import dymu
from dymu.data import load_image
from dymu.visualize.towers import Tower, input_view, pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def jpeg_bytes_per_pixel(image: Any, quality: int = 75) -> float:
    """Image complexity: size of the JPEG encoding (quality 75, in memory) per pixel."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else load_image(image)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / (img.width * img.height)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN if either side is constant or n < 2."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


@dataclass
class ScatterResult:
    names: list[str]
    complexity: list[float]  # JPEG bytes per pixel of each image's input view
    tokens: list[int]  # visual tokens kept at the layer (CLS not counted)
    spearman: float
    path: Path | None = None


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ValueError(f"{folder}: need at least 2 images ({', '.join(IMAGE_SUFFIXES)}), found {len(files)}")
    return files


@torch.no_grad()
def complexity_vs_tokens(tower: Tower, images: Sequence[Any], *, layer: int = -1, batch_size: int = 8) -> ScatterResult:
    names, complexity, tokens = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        values = pixels(tower, chunk)
        tower.model(pixel_values=values)
        kept = dymu.last_run(tower.model).num_tokens(layer) - (1 if tower.has_cls else 0)
        tokens += kept.tolist()
        complexity += [jpeg_bytes_per_pixel(v) for v in input_view(tower, values)]
        names += [Path(i).name if isinstance(i, (str, Path)) else f"image {start + k}" for k, i in enumerate(chunk)]
    return ScatterResult(names, complexity, tokens, spearman(complexity, tokens))
