"""Drawing to PNG with matplotlib's Agg backend (``pip install dymu[viz]``): :func:`render_merge_view` (the image,
its merge groups, the tokens per layer; image panels placed pixel for pixel, so the PNG's pixels can be checked
against :attr:`RenderedView.overlay`) and :func:`render_scatter` (complexity vs tokens kept)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dymu.visualize.complexity import ScatterResult
from dymu.visualize.merge_view import MergeView


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
