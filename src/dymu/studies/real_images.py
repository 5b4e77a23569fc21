"""Real images for the studies: every photo bundled with scikit-image and scikit-learn, synthetic images,
random resized crops of them, easy-vqa test images, and the DINOv2 input transform the studies use.

A module of its own because two studies (:mod:`dymu.studies.dinov2_thresholds`, :mod:`dymu.studies.vtu_kl_cases`)
and the encoder benchmark read the same images. Needs scikit-image (scikit-learn adds two photos, easy-vqa its
test images).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dymu.data import SquashResize, load_image
from dymu.weights import IMAGENET_MEAN, IMAGENET_STD

# scikit-image photographs (microscopy, astronomy, textures and scans included) and scikit-learn's samples
PHOTOS = [
    "astronaut", "brick", "camera", "cell", "chelsea", "clock_motion", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "ihc", "microaneurysms", "moon", "motorcycle_left", "motorcycle_right", "page", "retina",
    "rocket", "text",
]
SYNTHETIC = ["colorwheel", "logo", "horse", "shepp_logan_phantom", "checkerboard"]


def dinov2_input(size: int) -> SquashResize:
    """PIL image -> ``[3, S, S]`` DINOv2 input of the studies: bicubic squash to S×S, ImageNet normalisation."""
    return SquashResize(size, IMAGENET_MEAN, IMAGENET_STD)


def squashed(image: Image.Image, size: int) -> Image.Image:
    """The S×S RGB image :func:`dinov2_input` normalises (what image complexity is measured on)."""
    return load_image(image).resize((size, size), Image.BICUBIC)


def _rgb(array: np.ndarray) -> Image.Image:
    """Any scikit-image array (grey, RGB, RGBA, bool, float) as an 8-bit RGB PIL image."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64) / max(float(a.max()), 1e-12) * 255.0, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.shape[-1] == 4:  # RGBA (logo): composite on white
        alpha = a[..., 3:4].astype(np.float64) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return Image.fromarray(a[..., :3])


def _skimage(name: str) -> Image.Image:
    """``skimage.data.<name>()``, or the bundled file ``<name>.png`` when there is no such loader (ihc, motorcycle)."""
    from skimage import data  # optional (pip install scikit-image)

    loader = getattr(data, name, None)
    if callable(loader):
        return _rgb(loader())
    return _rgb(np.asarray(Image.open(Path(data.__file__).parent / f"{name}.png")))


def natural_photos() -> dict[str, Image.Image]:
    """The bundled photographs, by name (scikit-image ``data.<name>()``, scikit-learn ``china``/``flower``)."""
    photos = {name: _skimage(name) for name in PHOTOS}
    try:
        from sklearn.datasets import load_sample_images  # optional: two more photos
    except ImportError:
        print("scikit-learn not installed: its two sample photos are left out", file=sys.stderr)
        return photos
    samples = load_sample_images()
    for path, img in zip(samples.filenames, samples.images):
        photos[Path(path).stem] = _rgb(img)
    return photos


def synthetic_images() -> dict[str, Image.Image]:
    return {name: _skimage(name) for name in SYNTHETIC}


def random_crops(photos: dict[str, Image.Image], per_photo: int, size: int, seed: int) -> list[tuple[str, Image.Image]]:
    """Random resized crops (20–100% of the area, aspect 3/4–4/3, random flip), ``size``×``size``."""
    rng = random.Random(seed)
    out = []
    for name, img in photos.items():
        w, h = img.size
        for i in range(per_photo):
            for _ in range(20):
                area = rng.uniform(0.2, 1.0) * w * h
                aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if 0 < cw <= w and 0 < ch <= h:
                    break
            else:
                cw, ch = min(w, h), min(w, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            crop = img.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append((f"{name}#{i}", crop))
    return out


def named_image(name: str) -> Image.Image:
    """A bundled photo by name, or ``easy-vqa-<i>``: the i-th easy-vqa test image (package order)."""
    if name.startswith("easy-vqa-"):
        from easy_vqa import get_test_image_paths  # optional (pip install easy-vqa)

        paths = get_test_image_paths()
        return Image.open(paths[sorted(paths)[int(name.rsplit("-", 1)[1])]]).convert("RGB")
    return natural_photos()[name]
