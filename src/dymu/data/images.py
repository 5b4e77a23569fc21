"""Reading images: :func:`load_image`, dymu's one image reader (EXIF orientation, alpha, high bit depth)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

Transform = Callable[["object"], Tensor]  # PIL image -> [3, H, W]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img):
    """``img`` as 8-bit RGB, high-bit-depth greyscale scaled rather than clipped (``convert("RGB")`` would clip
    every value above 255, leaving a 16-bit image a few grey levels):

    * ``I;16*`` and ``I`` (Pillow's modes for 16-bit greyscale PNG / TIFF): the 16-bit range, value / 257
      (0 -> 0, 65535 -> 255); ``I`` values outside [0, 65535] are clipped;
    * ``F`` (32-bit float TIFF): values already in [0, 1] are scaled by 255; otherwise the image's own min-max
      range is stretched to [0, 255] (a constant image becomes black); NaN / inf become 0;
    * everything else: Pillow's ``convert("RGB")``.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        a = np.clip(np.asarray(img).astype(np.float64), 0, 65535) / 257.0
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        values = a[finite]
        if values.size == 0:
            a = np.zeros_like(a)
        elif values.min() >= 0.0 and values.max() <= 1.0:
            a = a * 255.0
        else:
            lo, hi = float(values.min()), float(values.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        a = np.where(finite, a, 0.0)
    else:
        return img.convert("RGB")
    grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    return grey.convert("RGB")


def has_alpha(img) -> bool:
    """Whether ``img`` has an alpha channel or a transparent palette / colour entry."""
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


_alpha_reported = False


def on_white(img, name: str = "an image"):
    """``img`` composited on a white background (``convert("RGB")`` would keep the colour under transparent
    pixels, often black); the first time in a process it says so (a warning)."""
    global _alpha_reported
    if not _alpha_reported:
        _alpha_reported = True
        warnings.warn(
            f"{name} has an alpha channel: composited on white (said once; later images with alpha are treated "
            "the same)",
            stacklevel=3,
        )
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _decode(img, name: str):
    """Upright (EXIF orientation applied, as a photo viewer shows it) 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    return on_white(img, name) if has_alpha(img) else to_rgb(img)


def load_image(image: "str | Path | object"):
    """A decoded RGB PIL image from a path (or a PIL image); FileNotFoundError / ValueError name the bad file.

    The one image reader of dymu (finding, encode, generate, eval, the demo, the lmms-eval task): the EXIF
    orientation is applied (a photo stored sideways is read upright), an alpha channel is composited on white
    (said once), and 16-bit greyscale and float images are scaled to 8 bits, not clipped (see :func:`to_rgb`).
    """
    if isinstance(image, Image.Image):
        return _decode(image, "an image")
    try:
        with Image.open(image) as img:
            return _decode(img, str(image))  # forces decoding: truncated files fail here
    except FileNotFoundError:
        path = Path(image)
        if path.is_symlink():
            raise FileNotFoundError(f"image not found: {image} is a dangling link (to {os.readlink(path)})") from None
        raise FileNotFoundError(f"image not found: {image}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot read image {image}: {type(err).__name__}: {err}") from err


def load_images(paths: Sequence[str | Path], transform: Transform) -> Tensor:
    """Load and preprocess image files into ``[B, 3, H, W]``; FileNotFoundError / ValueError name the bad file."""
    return torch.stack([transform(load_image(path)) for path in paths])
