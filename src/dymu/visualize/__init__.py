"""Pictures of what DToMe does: which patches merged together, and image complexity vs tokens kept.

* :mod:`dymu.visualize.towers` — the patched tower to draw from: :func:`demo_tower` (the demo's small random CLIP
  with thresholds found on the built-in images, :mod:`dymu.samples`: no downloads) or :func:`load_tower` (a local
  transformers CLIP/SigLIP folder);
* :mod:`dymu.visualize.merge_view` — :func:`merge_view`: per patch, the merged token that covers it at a layer
  (its group), one distinct colour per group, and the tokens kept after every layer;
* :mod:`dymu.visualize.complexity` — :func:`complexity_vs_tokens`: JPEG bytes per pixel of each image's input view
  against the tokens kept, with the Spearman rank correlation;
* :mod:`dymu.visualize.drawing` — :func:`render_merge_view` and :func:`render_scatter` write the PNGs (matplotlib's
  Agg backend, ``pip install dymu[viz]``).
"""

from dymu.visualize.complexity import (
    IMAGE_SUFFIXES,
    ScatterResult,
    complexity_vs_tokens,
    jpeg_bytes_per_pixel,
    list_images,
    spearman,
)
from dymu.visualize.drawing import RenderedView, overlay_image, render_merge_view, render_scatter, require_matplotlib
from dymu.visualize.merge_view import (
    KELLY,
    MergeView,
    group_colors,
    group_palette,
    groups_from_source_map,
    merge_view,
    merge_views,
)
from dymu.visualize.towers import (
    Tower,
    demo_tower,
    find_and_apply_thresholds,
    input_view,
    load_tower,
    parse_checkpoint_or_floats,
    pixels,
)

__all__ = [
    "IMAGE_SUFFIXES", "ScatterResult", "complexity_vs_tokens", "jpeg_bytes_per_pixel", "list_images", "spearman",
    "RenderedView", "overlay_image", "render_merge_view", "render_scatter", "require_matplotlib",
    "KELLY", "MergeView", "group_colors", "group_palette", "groups_from_source_map", "merge_view", "merge_views",
    "Tower", "demo_tower", "find_and_apply_thresholds", "input_view", "load_tower", "parse_checkpoint_or_floats",
    "pixels",
]
