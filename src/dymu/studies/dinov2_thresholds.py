"""DToMe thresholds for the real DINOv2 ViT-S/14: finding them on real images, and measuring tokens kept per image
against image complexity (``eval_scripts/real_dinov2_thresholds.py`` is the command; docs/real_weights.md the
write-up). A module of its own: the one study of how found thresholds adapt the token count on a real encoder.

Finding (:func:`dymu.finding.find_thresholds`): constant schedule, a shuffled 50/50 mix of easy-vqa train images
and random crops of the bundled photos (seed 0), so ``K`` is the average over that mix. Measuring: easy-vqa test
images, each whole photo, other random crops (seed 1) and the synthetic images, with each checkpoint's thresholds
and the authors' single-image token order (per image, so independent of how the samples are batched).

Complexity of an image = its S×S RGB model input, as PNG bytes per pixel (zlib level 6), JPEG bytes per pixel
(quality 90), and edge density (fraction of pixels whose Sobel gradient magnitude of the grey image in [0, 1]
exceeds 0.1).
"""

from __future__ import annotations

import io
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

import dymu
from dymu.data import ImageList
from dymu.finding import find_thresholds
from dymu.studies.real_images import dinov2_input, natural_photos, random_crops, squashed, synthetic_images
from dymu.thresholds import load_thresholds, merge_schedule
from dymu.visualize import require_matplotlib, spearman

# (resolution, K) pairs: 224 px = 256 patches (+CLS), 448 px = 1024 patches
CONFIGS: list[tuple[int, int]] = [(224, 64), (224, 128), (448, 256)]
# finding: (easy-vqa train images, natural crops) per resolution; measuring: (easy-vqa test images, crops per photo)
FIND_SIZES = {224: (800, 800), 448: (400, 400)}
EVAL_SIZES = {224: (1000, 10), 448: (300, 10)}
QUICK_FIND_SIZES, QUICK_EVAL_SIZES = {224: (16, 16), 448: (8, 8)}, {224: (16, 1), 448: (8, 1)}
MEASURES = ("png_bpp", "jpeg_bpp", "edge_density")


def _print_now(line: str) -> None:
    print(line, flush=True)  # progress of a long run, seen as it happens


def checkpoint_name(size: int, k: int) -> str:
    return f"dinov2-small-{size}-tome-{k}out"


# ------------------------------------------------------------------------------------------ complexity
def complexity(image: Image.Image) -> dict[str, float]:
    """PNG / JPEG bytes per pixel and Sobel edge density of an RGB image (the model input)."""
    from scipy import ndimage  # optional (pip install scipy)

    pixels = image.size[0] * image.size[1]
    png, jpg = io.BytesIO(), io.BytesIO()
    image.save(png, format="PNG", compress_level=6)
    image.save(jpg, format="JPEG", quality=90)
    grey = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    magnitude = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)) / 8.0  # Sobel sums 8 weighted differences
    return {
        "png_bpp": png.tell() / pixels,
        "jpeg_bpp": jpg.tell() / pixels,
        "edge_density": float((magnitude > 0.1).mean()),
    }


# --------------------------------------------------------------------------------------------- finding
def finding_list(work: Path, size: int, easy_vqa: int, crops: int, seed: int = 0) -> ImageList:
    """A shuffled 50/50 list of easy-vqa train images and natural crops (written as PNG under ``work``)."""
    from easy_vqa import get_train_image_paths  # optional (pip install easy-vqa)

    crop_dir = work / f"finding_crops_{size}"
    crop_dir.mkdir(parents=True, exist_ok=True)
    photos = natural_photos()
    per_photo = -(-crops // len(photos))
    paths = []
    for name, img in random_crops(photos, per_photo, size, seed)[:crops]:
        path = crop_dir / f"{name.replace('#', '_')}.png"
        if not path.exists():
            img.save(path)
        paths.append(str(path))
    train = get_train_image_paths()
    paths += [str(train[i]) for i in sorted(train)[:easy_vqa]]
    random.Random(seed).shuffle(paths)  # every batch mixes both kinds
    return ImageList(paths, Path("/"))  # absolute paths: image_dir / path == path


def find(model: nn.Module, size: int, k: int, images: ImageList, output: Path, batch_size: int,
         token_order: str = "authors") -> None:
    """Find the thresholds that keep ``k`` of the ``(size/14)²`` patches on average over ``images``, into ``output``."""
    patches = (size // 14) ** 2
    counts = merge_schedule("constant", patches - k, len(model.encoder.layer))
    t0 = time.perf_counter()
    result = find_thresholds(
        model, images, dinov2_input(size), merge_counts=counts, batch_size=batch_size, output=output,
        overwrite=True, model_source="dymu.weights:dinov2-small", token_order=token_order,
    )
    print(
        f"found {output.name}: {result.images_seen} images in {time.perf_counter() - t0:.0f}s, thresholds "
        + " ".join(f"{t:.3f}" for t in result.checkpoint.thresholds.tolist()),
        flush=True,
    )


# ------------------------------------------------------------------------------------------- measuring
@dataclass
class Sample:
    name: str
    kind: str  # "easy-vqa", "photo", "photo-crop", "synthetic"
    image: Image.Image


def eval_samples(easy_vqa: int, crops_per_photo: int, size: int) -> list[Sample]:
    from easy_vqa import get_test_image_paths  # optional (pip install easy-vqa)

    test = get_test_image_paths()
    samples = [Sample(f"easy-vqa/{i}", "easy-vqa", Image.open(test[i]).convert("RGB")) for i in sorted(test)[:easy_vqa]]
    photos = natural_photos()
    samples += [Sample(name, "photo", img) for name, img in photos.items()]
    samples += [Sample(n, "photo-crop", img) for n, img in random_crops(photos, crops_per_photo, size, seed=1)]
    samples += [Sample(name, "synthetic", img) for name, img in synthetic_images().items()]
    return samples


@torch.no_grad()
def token_counts(
    model: nn.Module, checkpoint: Path, samples: list[Sample], size: int, batch_size: int, token_order: str = "single"
) -> list[int]:
    """Patch tokens (CLS excluded) each sample keeps after the last block with the checkpoint's thresholds.

    ``token_order="single"`` (the authors' order on each image as if alone: what their per-image inference keeps,
    independent of how the samples are batched here) or ``"raster"``."""
    transform = dinov2_input(size)
    dymu.patch(model, load_thresholds(checkpoint), token_order=token_order)
    try:
        counts: list[int] = []
        for start in range(0, len(samples), batch_size):
            x = torch.stack([transform(s.image) for s in samples[start : start + batch_size]])
            model(pixel_values=x)
            counts += (dymu.last_run(model).num_tokens() - 1).tolist()
    finally:
        dymu.unpatch(model)
    return counts


def spearman_p(rho: float, n: int) -> float:
    """Two-sided p-value of a Spearman ρ over ``n`` pairs (t-distribution with n−2 degrees of freedom, as
    ``scipy.stats.spearmanr``)."""
    from scipy.stats import t as student_t  # optional (pip install scipy)

    if n < 3 or not np.isfinite(rho):
        return float("nan")
    if abs(rho) >= 1.0:
        return 0.0
    stat = rho * np.sqrt((n - 2) / ((1.0 + rho) * (1.0 - rho)))
    return float(2 * student_t.sf(abs(stat), n - 2))


def summarize(counts: list[int], samples: list[Sample], cx: list[dict[str, float]]) -> dict:
    """Token statistics per kind and Spearman ρ of tokens vs each complexity measure (all, easy-vqa, natural)."""
    kinds = sorted({s.kind for s in samples})
    out: dict = {"tokens": {}, "spearman": {}, "spearman_p": {}}
    c = np.asarray(counts, dtype=np.float64)
    for kind in kinds + ["all"]:
        sel = np.array([kind == "all" or s.kind == kind for s in samples])
        out["tokens"][kind] = {"n": int(sel.sum()), "mean": float(c[sel].mean()), "std": float(c[sel].std()),
                               "min": int(c[sel].min()), "max": int(c[sel].max())}
    # the finding mix was 50/50 easy-vqa / natural crops: its average is what K targets
    out["tokens"]["finding_mix_estimate"] = 0.5 * (out["tokens"]["easy-vqa"]["mean"] + out["tokens"]["photo-crop"]["mean"])
    groups = {"all": lambda s: True, "easy-vqa": lambda s: s.kind == "easy-vqa",
              "natural": lambda s: s.kind in ("photo", "photo-crop")}
    for group, keep in groups.items():
        sel = [i for i, s in enumerate(samples) if keep(s)]
        rhos = {m: spearman(c[sel], [cx[i][m] for i in sel]) for m in MEASURES}
        out["spearman"][group] = rhos
        out["spearman_p"][group] = {m: spearman_p(rho, len(sel)) for m, rho in rhos.items()}
    return out


def measure_checkpoints(model: nn.Module, checkpoint_dir: Path, eval_sizes: dict[int, tuple[int, int]],
                        token_order: str = "single", configs: list[tuple[int, int]] = CONFIGS,
                        log: Callable[[str], None] | None = None) -> dict:
    """Per checkpoint of ``configs`` (found under ``checkpoint_dir``): its summary and, per image, the tokens kept
    and the complexity measures — the results JSON of the script, the input of :func:`plot`."""
    samples_by_size: dict[int, list[Sample]] = {}
    cx_by_size: dict[int, list[dict[str, float]]] = {}
    blob: dict = {}
    for size, k in configs:
        if size not in samples_by_size:
            samples_by_size[size] = eval_samples(*eval_sizes[size], size)
            cx_by_size[size] = [complexity(squashed(s.image, size)) for s in samples_by_size[size]]
        samples, cx = samples_by_size[size], cx_by_size[size]
        name = checkpoint_name(size, k)
        t0 = time.perf_counter()
        counts = token_counts(model, checkpoint_dir / f"{name}.safetensors", samples, size, 16, token_order)
        summary = summarize(counts, samples, cx)
        (log or _print_now)(f"{name} ({time.perf_counter() - t0:.0f}s):\n" + json.dumps(summary, indent=1))
        blob[name] = {"size": size, "k": k, "summary": summary,
                      "per_image": [{"name": s.name, "kind": s.kind, "tokens": n, **c}
                                    for s, n, c in zip(samples, counts, cx)]}
    return blob


def plot(blob: dict, path: Path) -> None:
    """One scatter panel per setting: tokens kept vs PNG bytes per pixel, coloured by image kind."""
    plt = require_matplotlib()
    colors = {"easy-vqa": "tab:blue", "photo": "tab:red", "photo-crop": "tab:orange", "synthetic": "tab:green"}
    fig, axes = plt.subplots(1, len(blob), figsize=(5.2 * len(blob), 4.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], blob.items()):
        size, rows = res["size"], res["per_image"]
        for kind, color in colors.items():
            sel = [r for r in rows if r["kind"] == kind]
            ax.scatter([r["png_bpp"] for r in sel], [r["tokens"] for r in sel], s=8 if kind == "easy-vqa" else 16,
                       alpha=0.5 if kind == "easy-vqa" else 0.8, c=color, label=f"{kind} ({len(sel)})",
                       edgecolors="none")
        ax.set_xscale("log")
        rho = res["summary"]["spearman"]
        ax.set_title(f"{name}\nSpearman ρ (PNG B/px): all {rho['all']['png_bpp']:.2f}, "
                     f"easy-vqa {rho['easy-vqa']['png_bpp']:.2f}, natural {rho['natural']['png_bpp']:.2f}", fontsize=9)
        ax.set_xlabel(f"PNG bytes per pixel of the {size}×{size} input (log)")
        ax.set_ylabel(f"patch tokens kept after block 12 (of {(size // 14) ** 2})")
        ax.axhline(res["k"], color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("DToMe on DINOv2-S/14 (real weights): tokens per image vs image complexity "
                 "(dashed: K, the average over the finding mix)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
