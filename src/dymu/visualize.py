"""Pictures of what DToMe does: which patches merged together, and image complexity vs tokens kept.

* :func:`merge_view` runs a patched CLIP/SigLIP tower on an image and returns a :class:`MergeView`:
  per patch, the merged token that covers it at a layer (its group), one distinct colour per group,
  and the tokens kept after every layer.
* :func:`render_merge_view` draws it to a PNG: the image as the model sees it, the same image with
  every patch tinted by its group's colour and the group boundaries drawn in white, and the tokens kept
  per layer. Image panels are placed pixel for pixel (no resampling), so the PNG's pixels can be checked
  against :attr:`RenderedView.overlay`.
* :func:`complexity_scatter` plots, over a folder of images, image complexity (JPEG-compressed bytes per
  pixel at quality 75, computed in memory on the model's input view) against the tokens kept, with the
  Spearman rank correlation in the title.

The default model (:func:`demo_tower`) is the demo's small random CLIP with thresholds found on the
built-in images (:mod:`dymu.samples`), so everything works without downloads; :func:`load_tower` also
takes a local transformers CLIP/SigLIP folder. Plots use matplotlib's Agg backend (``pip install
dymu[viz]``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import dymu
from dymu.data import load_image
from dymu.thresholds import merge_schedule

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "dymu's pictures need matplotlib, which is not installed: pip install 'dymu[viz]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------ models
@dataclass
class Tower:
    """A DToMe-patched vision tower ready to encode images."""

    model: nn.Module
    processor: Any  # a transformers image processor (image_mean, image_std, __call__)
    description: str
    has_cls: bool
    patch_size: int
    image_size: int
    thresholds: list[float] = field(default_factory=list)


def demo_tower(
    *, layers: int = 6, image_size: int = 224, r_total: int = 150, schedule: str = "constant",
    calibration_images: int = 16, seed: int = 0,
) -> Tower:
    """The demo's small random CLIP ViT (``dymu demo``, :func:`dymu.demo.random_clip`), with thresholds found on
    built-in images."""
    from dymu.demo import random_clip
    from dymu.samples import image_set

    model, processor = random_clip(layers=layers, image_size=image_size, patch_size=14, seed=seed)
    tower = Tower(model, processor, "", True, 14, image_size)
    find_and_apply_thresholds(tower, r_total=r_total, schedule=schedule, images=image_set(calibration_images, image_size))
    tower.description = (
        f"random CLIP ViT ({layers} layers, {image_size} px, patch 14); thresholds found on "
        f"{calibration_images} built-in images, r_total {r_total} ({schedule})"
    )
    return tower


def load_tower(
    path: str | Path, thresholds: str | Sequence[float] | None = None, *, r_total: int | None = None,
    schedule: str = "constant", device: str = "cpu",
) -> Tower:
    """A local transformers CLIP or SigLIP folder (full model or vision model), patched with DToMe.

    ``thresholds``: a threshold checkpoint path or per-layer floats; if None they are found on the
    built-in images with ``r_total`` merges (default: merge to 1/8 of the patches, like 72out of 576).
    """
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path} (expected a local transformers CLIP/SigLIP folder)")
    config = AutoConfig.from_pretrained(path)
    kind = config.model_type
    if kind in ("clip", "clip_vision_model"):
        model_cls, has_cls = CLIPVisionModel, True
    elif kind in ("siglip", "siglip_vision_model"):
        model_cls, has_cls = SiglipVisionModel, False
    else:
        raise ValueError(f"{path}: model_type {kind!r} is not a CLIP or SigLIP model")
    model = model_cls.from_pretrained(path, attn_implementation="sdpa").to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: no image processor config (preprocessor_config.json): {err}") from None
    vc = model.config
    tower = Tower(model, processor, f"{kind} from {path}", has_cls, vc.patch_size, vc.image_size)
    if thresholds is None:
        from dymu.samples import image_set

        patches = (vc.image_size // vc.patch_size) ** 2
        r = r_total if r_total is not None else patches - patches // 8
        find_and_apply_thresholds(tower, r_total=r, schedule=schedule, images=image_set(16, vc.image_size))
        tower.description += f"; thresholds found on 16 built-in (synthetic) images, r_total {r} — pass real ones with --thresholds"
    else:
        dymu.patch(model, thresholds)
        tower.thresholds = dymu.get_state(model).thresholds.tolist()
        tower.description += f"; thresholds {thresholds if isinstance(thresholds, (str, Path)) else 'given'}"
    return tower


def find_and_apply_thresholds(tower: Tower, *, r_total: int, schedule: str, images: Sequence[Any]) -> list[float]:
    """Find thresholds on ``images`` and leave the tower patched in inference mode with them."""
    model = tower.model
    if "_dymu_state" in model.__dict__:
        dymu.unpatch(model)
    state = dymu.patch(model)
    counts = merge_schedule(schedule, r_total, state.num_layers)
    dymu.configure(model, merge_counts=counts)
    with torch.no_grad():
        model(pixel_values=pixels(tower, images))
    tower.thresholds = list(dymu.last_run(model).found_thresholds)
    dymu.configure(model, thresholds=tower.thresholds)
    return tower.thresholds


def parse_thresholds(value: str | None) -> str | list[float] | None:
    """``--thresholds``: a checkpoint path, a DyMU name (resolved by :func:`dymu.patch`), or comma-separated
    per-layer floats."""
    from dymu.encoders.names import is_dymu_name

    if value is None:
        return None
    if Path(value).exists() or is_dymu_name(value):
        return value
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise FileNotFoundError(
            f"--thresholds: no such checkpoint, not a DyMU name and not a comma-separated list of floats: {value}"
        ) from None


# ----------------------------------------------------------------------------------------- images
def pixels(tower: Tower, images: Sequence[Any]) -> torch.Tensor:
    param = next(tower.model.parameters())
    values = tower.processor(images=[load_image(i) for i in images], return_tensors="pt").pixel_values
    return values.to(param.device, param.dtype)


def input_view(tower: Tower, pixel_values: torch.Tensor) -> np.ndarray:
    """``[B, H, W, 3]`` uint8: the images exactly as the model sees them (normalisation undone)."""
    mean = torch.tensor(tower.processor.image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(tower.processor.image_std, dtype=torch.float32)[None, :, None, None]
    rgb = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------- analysis
@dataclass
class MergeView:
    """Which patches share a merged token at ``layer``, for one image."""

    image: np.ndarray  # [H, W, 3] uint8, the model's input view
    groups: np.ndarray  # [gh, gw] int: group of each patch, numbered 0.. in raster order of first patch
    colors: np.ndarray  # [gh, gw, 3] uint8: the group's colour (distinct groups, distinct colours)
    tokens_per_layer: list[int]  # tokens at the input and after each block (CLS included if any)
    layer: int  # hidden-state index the groups are taken from (1..L; L = last block's output)
    has_cls: bool
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.groups.shape  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        """Visual tokens kept at ``layer`` (CLS not counted)."""
        return int(self.groups.max()) + 1


# Kelly's colours of maximum contrast (white and black left out): the largest groups get these.
KELLY = np.array([
    [0xF3, 0xC3, 0x00], [0x87, 0x56, 0x92], [0xF3, 0x84, 0x00], [0xA1, 0xCA, 0xF1], [0xBE, 0x00, 0x32],
    [0xC2, 0xB2, 0x80], [0x00, 0x88, 0x56], [0xE6, 0x8F, 0xAC], [0x00, 0x67, 0xA5], [0xF9, 0x93, 0x79],
    [0x60, 0x4E, 0x97], [0xF6, 0xA6, 0x00], [0xB3, 0x44, 0x6C], [0xDC, 0xD3, 0x00], [0x88, 0x2D, 0x17],
    [0x8D, 0xB6, 0x00], [0x65, 0x45, 0x22], [0xE2, 0x58, 0x22], [0x2B, 0x3D, 0x26], [0x84, 0x84, 0x82],
], dtype=np.uint8)


def group_palette(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` uint8 colours, all distinct: Kelly's high-contrast colours first, then a shuffled lattice."""
    levels = max(3, math.ceil((n + len(KELLY)) ** (1 / 3)) + 1)
    values = np.linspace(40, 235, levels).round().astype(np.uint8)
    lattice = np.stack(np.meshgrid(values, values, values, indexing="ij"), -1).reshape(-1, 3)
    spread = lattice.max(1).astype(int) - lattice.min(1).astype(int)
    lattice = lattice[np.argsort(-spread, kind="stable")][: max(n, len(lattice) // 2)]  # prefer saturated colours
    lattice = lattice[np.random.default_rng(seed).permutation(len(lattice))]
    known = {tuple(c) for c in KELLY}
    lattice = np.array([c for c in lattice if tuple(c) not in known], dtype=np.uint8).reshape(-1, 3)
    return np.concatenate([KELLY, lattice])[:n]


def group_colors(groups: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 colour per patch: distinct groups get distinct colours, larger groups the more distinct ones."""
    sizes = np.bincount(groups.ravel())
    by_size = np.argsort(-sizes, kind="stable")  # ties: lower (earlier) group first
    palette = np.empty((len(sizes), 3), dtype=np.uint8)
    palette[by_size] = group_palette(len(sizes))
    return palette[groups]


def groups_from_source_map(source_map: torch.Tensor, grid: tuple[int, int], has_cls: bool) -> np.ndarray:
    """``[gh, gw]`` group id per patch from one image's source map (CLS position dropped), renumbered 0..k-1."""
    patch_map = source_map[1:] if has_cls else source_map
    ids = patch_map.cpu().numpy()
    _, groups = np.unique(ids, return_inverse=True)  # merged tokens keep raster order of their first patch
    return groups.reshape(grid)


@torch.no_grad()
def merge_views(tower: Tower, images: Sequence[Any], layer: int = -1) -> list[MergeView]:
    """Encode ``images`` with the patched tower and describe each image's merge groups at ``layer``."""
    values = pixels(tower, images)
    tower.model(pixel_values=values)
    run = dymu.last_run(tower.model)
    num_states = len(run.sizes)
    index = layer if layer >= 0 else num_states + layer
    if not 0 <= index < num_states:
        raise ValueError(f"layer {layer} is out of range: the tower has {num_states - 1} blocks (use 0..{num_states - 1} or -1)")
    side = tower.image_size // tower.patch_size
    views_rgb = input_view(tower, values)
    tokens = run.tokens_per_layer().T.tolist()
    out = []
    for b in range(values.shape[0]):
        groups = groups_from_source_map(run.source_maps[index][b], (side, side), tower.has_cls)
        colors = group_colors(groups)
        out.append(MergeView(views_rgb[b], groups, colors, tokens[b], index, tower.has_cls, tower.patch_size))
    return out


def merge_view(tower: Tower, image: Any, layer: int = -1) -> MergeView:
    return merge_views(tower, [image], layer)[0]


# ------------------------------------------------------------------------------------------ render
@dataclass
class RenderedView:
    """Where things are in the PNG written by :func:`render_merge_view` (pixel coordinates, origin top-left)."""

    path: Path
    size: tuple[int, int]  # (width, height) of the PNG
    scale: int  # image panels are the model's input view enlarged by this integer factor
    original_origin: tuple[int, int]  # (x, y) of the original panel's top-left pixel
    overlay_origin: tuple[int, int]  # (x, y) of the overlay panel's top-left pixel
    overlay: np.ndarray  # [H*scale, W*scale, 3] uint8, the overlay panel's pixels as drawn
    patch_centers: np.ndarray  # [gh, gw, 2] int, (x, y) in the PNG of each patch's centre in the overlay panel


def overlay_image(view: MergeView, scale: int = 1, alpha: float = 0.6) -> np.ndarray:
    """The input view, enlarged ``scale``×, each patch tinted by its group's colour, group boundaries in white."""
    image = np.repeat(np.repeat(view.image, scale, 0), scale, 1).astype(np.float32)
    p = view.patch_size * scale
    tint = np.repeat(np.repeat(view.colors, p, 0), p, 1).astype(np.float32)
    h, w = tint.shape[:2]
    out = image[:h, :w] * (1 - alpha) + tint * alpha
    g = view.groups
    width = max(1, scale)  # boundary half-width in pixels, on each side of a patch edge
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            y, x = i * p, j * p
            if j + 1 < g.shape[1] and g[i, j] != g[i, j + 1]:
                out[y : y + p, x + p - width : x + p + width] = 255
            if i + 1 < g.shape[0] and g[i, j] != g[i + 1, j]:
                out[y + p - width : y + p + width, x : x + p] = 255
    return out.round().clip(0, 255).astype(np.uint8)


def render_merge_view(view: MergeView, out: str | Path, *, title: str | None = None, subtitle: str | None = None) -> RenderedView:
    """Write the PNG (original | merge groups | tokens per layer) and return where everything is."""
    plt = require_matplotlib()
    h0, w0 = view.image.shape[:2]
    scale = max(1, 448 // max(h0, w0))
    h, w = h0 * scale, w0 * scale
    margin, gap, top, bottom = 24, 24, 72, 40
    plot_w = max(320, w)
    width, height = margin + w + gap + w + gap + 56 + plot_w + margin, top + h + bottom
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    try:
        ox_orig, ox_over, oy = margin, margin + w + gap, top
        original = np.repeat(np.repeat(view.image, scale, 0), scale, 1)
        overlay = overlay_image(view, scale)
        # figimage places raw pixels (no resampling); offsets are from the figure's bottom-left corner
        fig.figimage(original, xo=ox_orig, yo=height - oy - h, origin="upper")
        fig.figimage(overlay, xo=ox_over, yo=height - oy - h, origin="upper")
        kept = view.num_groups
        n_patches = view.groups.size
        fig.text(ox_orig / width, 1 - (oy - 8) / height, "input (as the model sees it)", va="bottom", fontsize=10)
        fig.text(ox_over / width, 1 - (oy - 8) / height,
                 f"merge groups after layer {view.layer}: {kept} of {n_patches} patch tokens", va="bottom", fontsize=10)
        fig.text(margin / width, 1 - 10 / height, title or "DToMe: which patches were merged together",
                 va="top", fontsize=13, weight="bold")
        if subtitle:
            fig.text(margin / width, 1 - 32 / height, subtitle, va="top", fontsize=8, color="0.3", wrap=True)
        # tokens per layer
        left = ox_over + w + gap + 56
        ax = fig.add_axes([left / width, (bottom + 16) / height, plot_w / width, (h - 16) / height])
        layers = list(range(len(view.tokens_per_layer)))
        ax.plot(layers, view.tokens_per_layer, marker="o", color="tab:blue")
        ax.axvline(view.layer, color="tab:orange", linestyle="--", linewidth=1)
        for x, y in zip(layers, view.tokens_per_layer):
            ax.annotate(str(y), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.set_xlabel("layer (0 = input)")
        ax.set_ylabel("tokens kept" + (" (incl. CLS)" if view.has_cls else ""))
        ax.set_title("tokens kept per layer", fontsize=10)
        ax.set_ylim(0, view.tokens_per_layer[0] * 1.12)
        ax.grid(alpha=0.3)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    p = view.patch_size * scale
    gh, gw = view.groups.shape
    centers = np.stack(np.meshgrid(np.arange(gw) * p + p // 2 + ox_over, np.arange(gh) * p + p // 2 + oy, indexing="xy"), -1)
    return RenderedView(out, (width, height), scale, (ox_orig, oy), (ox_over, oy), overlay, centers)


# -------------------------------------------------------------------------------------- complexity
def jpeg_bytes_per_pixel(image: Any, quality: int = 75) -> float:
    """Image complexity: size of the JPEG encoding (quality 75, in memory) per pixel."""
    from PIL import Image

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


def render_scatter(result: ScatterResult, out: str | Path, *, subtitle: str | None = None) -> Path:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 5.2), dpi=100)
    try:
        ax.scatter(result.complexity, result.tokens, color="tab:blue", alpha=0.8)
        if len(result.names) <= 24:
            for x, y, name in zip(result.complexity, result.tokens, result.names):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.35")
        rho = result.spearman
        ax.set_title(f"complexity vs tokens kept — Spearman ρ = {rho:.3f} (n = {len(result.names)})"
                     if math.isfinite(rho) else f"complexity vs tokens kept — Spearman ρ undefined (n = {len(result.names)})",
                     fontsize=11)
        ax.set_xlabel("JPEG bytes per pixel (quality 75, model input view)")
        ax.set_ylabel("visual tokens kept")
        ax.grid(alpha=0.3)
        if subtitle:
            fig.text(0.01, 0.01, subtitle, fontsize=7, color="0.4", va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.05 if subtitle else 0, 1, 1))
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, format="png")
    finally:
        plt.close(fig)
    result.path = out
    return out


def complexity_scatter(tower: Tower, folder: str | Path, out: str | Path, *, layer: int = -1) -> ScatterResult:
    """Complexity vs tokens over every image in ``folder``; writes the scatter plot to ``out``."""
    files = list_images(folder)
    result = complexity_vs_tokens(tower, files, layer=layer)
    render_scatter(result, out, subtitle=tower.description)
    return result
