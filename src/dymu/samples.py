"""Built-in images made in code (no downloads): for the demo, tests, benchmarks and docs.

Complexity is controlled: ``flat`` is one colour, ``gradient`` a smooth ramp, ``stripes``
a regular pattern, ``textured`` interfering waves plus noise — so a DToMe encoder
should keep the fewest tokens for the first and the most for the last.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

KINDS = ("flat", "gradient", "stripes", "textured")


def make_image(kind: str, size: int = 224, seed: int = 0) -> Image.Image:
    """An RGB image of ``kind`` (one of :data:`KINDS`)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    if kind == "flat":
        rgb = np.broadcast_to(rng.uniform(0.2, 0.8, 3), (size, size, 3))
    elif kind == "gradient":
        rgb = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * rng.uniform(0.5, 1.0, 3)
    elif kind == "stripes":
        period = rng.integers(4, 12)
        band = (np.floor(xx * size / period) % 2)[..., None]
        rgb = band * rng.uniform(0, 1, 3) + (1 - band) * rng.uniform(0, 1, 3)
    elif kind == "textured":
        f = rng.uniform(10, 40, 3)
        rgb = np.stack(
            [
                np.sin(f[0] * xx * yy + 3 * np.sin(9 * yy)),
                np.cos(f[1] * xx + 17 * yy**2),
                np.sin(f[2] * (xx - yy) ** 2),
            ],
            -1,
        ) * 0.35 + 0.5 + 0.15 * rng.standard_normal((size, size, 3))
    else:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {', '.join(KINDS)}")
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def image_set(n: int, size: int = 224) -> list[Image.Image]:
    """``n`` images cycling through :data:`KINDS` with different seeds."""
    return [make_image(KINDS[i % len(KINDS)], size, seed=i) for i in range(n)]
