"""Image datasets for threshold finding: the authors' JSON list format.

The JSON file is a list of records, each with an ``"image"`` path relative to ``image_dir``::

    [{"image": "coco/train2017/000000033471.jpg"}, {"image": "cat.png", "id": 7, ...}]

(LLaVA instruction-tuning files are in this format: other keys are ignored, and text-only records without an
``"image"`` key are skipped and counted.) Plain strings are accepted as records too.

Batches are formed *by position in the list*: global batch ``i`` is entries ``[i*B, (i+1)*B)`` (after
``max_images``). An image that is missing or unreadable is dropped from its own batch only, so that batch is
smaller and every other batch is unchanged — which keeps resuming exact. With several processes, each global
batch is cut into contiguous slices, one per rank (rank 0 first), so the ranks together see exactly the
images, in the same order, as one process would.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

Transform = Callable[["object"], Tensor]  # PIL image -> [3, H, W]


@dataclass
class ImageList:
    """The image paths of a JSON list, in order, and what was left out while reading it."""

    paths: list[str]
    image_dir: Path
    json_path: Path | None = None
    without_image: int = 0  # records with no "image" key (text-only), skipped

    def duplicates(self) -> dict[str, int]:
        """Paths listed more than once, with how often (each listing is used: it weighs that image more)."""
        counts: dict[str, int] = {}
        for p in self.paths:
            p = os.path.normpath(p)  # "a.png" and "./a.png" are one file
            counts[p] = counts.get(p, 0) + 1
        return {p: n for p, n in counts.items() if n > 1}

    def fingerprint(self) -> str:
        """A hash of the image dir and the relative paths, in order (resume refuses another list)."""
        h = hashlib.sha256(str(self.image_dir.resolve()).encode())
        for p in self.paths:
            h.update(b"\0" + p.encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.paths)


def read_json(json_path: Path, what: str) -> Any:
    """The parsed content of a JSON file; FileNotFoundError / ValueError name the file and the problem."""
    if not json_path.is_file():
        raise FileNotFoundError(f"{what} not found: {json_path}")
    try:
        return json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{json_path} is not UTF-8 text: {err}") from err


def read_image_list(json_path: str | Path, image_dir: str | Path | None = None, *, max_images: int | None = None) -> ImageList:
    """Read and validate the JSON list; ``image_dir`` defaults to the JSON file's folder.

    Raises FileNotFoundError for a missing file and ValueError for malformed JSON, a non-list, a bad record or a
    list with no image at all.
    """
    json_path = Path(json_path)
    records = read_json(json_path, "image list")
    if not isinstance(records, list):
        raise ValueError(f"{json_path} must hold a JSON list of {{\"image\": \"relative/path\"}} records, got a {type(records).__name__}")
    paths, without = [], 0
    for i, record in enumerate(records):
        if isinstance(record, str):
            image = record
        elif isinstance(record, dict):
            if "image" not in record:
                without += 1
                continue
            image = record["image"]
        else:
            raise ValueError(f"{json_path}: record {i} must be an object with an \"image\" key, got {record!r:.80}")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{json_path}: record {i} has \"image\" = {image!r:.80}; expected a relative path string")
        paths.append(image)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        paths = paths[:max_images]
    if not paths:
        raise ValueError(f"{json_path} lists no images ({len(records)} records, {without} without an \"image\" key)")
    directory = Path(image_dir) if image_dir is not None else json_path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory not found: {directory}")
    return ImageList(paths, directory, json_path, without)


@dataclass
class Item:
    index: int  # position in the image list
    pixel_values: Tensor | None
    error: str | None = None


class ImageListDataset(Dataset):
    """Loads and preprocesses the images of an :class:`ImageList`; failures become items with an ``error``."""

    def __init__(self, images: ImageList, transform: Transform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Item:
        path = self.images.image_dir / self.images.paths[index]
        try:
            return Item(index, self.transform(load_image(path)))
        except FileNotFoundError:
            return Item(index, None, f"dangling link to {os.readlink(path)}" if path.is_symlink() else "missing")
        except ValueError as err:
            return Item(index, None, f"unreadable: {err.__cause__!r}" if err.__cause__ else f"unreadable: {err}")


@dataclass
class Batch:
    """One process's slice of a global batch."""

    number: int  # global batch index
    indices: list[int] = field(default_factory=list)  # list positions of the images that loaded
    pixel_values: Tensor | None = None  # [b, 3, H, W], None when b == 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (list position, reason)


def collate(items: list[Item]) -> Batch:
    ok = [it for it in items if it.pixel_values is not None]
    return Batch(
        number=-1,
        indices=[it.index for it in ok],
        pixel_values=torch.stack([it.pixel_values for it in ok]) if ok else None,
        failed=[(it.index, it.error or "error") for it in items if it.pixel_values is None],
    )


def shard(start: int, stop: int, rank: int, world_size: int) -> range:
    """Contiguous slice ``rank`` of ``range(start, stop)`` cut into ``world_size`` near-equal parts (first ranks
    get the extra), so concatenating the slices in rank order gives the whole range back."""
    n = stop - start
    base, extra = divmod(n, world_size)
    lo = start + rank * base + min(rank, extra)
    return range(lo, lo + base + (1 if rank < extra else 0))


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of global batches ``first, first+1, …`` (batch ``i`` = entries ``[i*B, (i+1)*B)``)."""

    def __init__(self, num_images: int, batch_size: int, *, rank: int = 0, world_size: int = 1, first: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_images, self.batch_size, self.rank, self.world_size, self.first = (
            num_images,
            batch_size,
            rank,
            world_size,
            first,
        )

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.first, self.num_batches):
            start = i * self.batch_size
            yield list(shard(start, min(start + self.batch_size, self.num_images), self.rank, self.world_size))

    def __len__(self) -> int:
        return max(0, self.num_batches - self.first)


def batches(
    dataset: ImageListDataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    first: int = 0,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Iterate this rank's :class:`Batch` of every global batch from ``first`` on (empty slices included).

    Loading workers ignore Ctrl-C and SIGTERM (a terminal sends them to the whole process group): the main process
    alone stops, and closing this generator (or an exception in the loop that consumes it) shuts the workers down
    at once, so an interrupted run prints nothing but its own message."""
    from torch.utils.data import DataLoader

    sampler = GlobalBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, first=first)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )
    stream = iter(loader)
    try:
        for number, batch in enumerate(stream, start=first):
            batch.number = number
            yield batch
    finally:
        shutdown = getattr(stream, "_shutdown_workers", None)  # the multi-process iterator's own cleanup
        if shutdown is not None:
            shutdown()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker leaves SIGINT / SIGTERM to the main process, which shuts it down
    (a worker exits by itself when the main process is gone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def hf_transform(processor) -> Transform:
    """A transform from a transformers image processor (``AutoImageProcessor``)."""
    return _HFTransform(processor)


class _HFTransform:
    # a class, not a lambda, so DataLoader workers can pickle it under any start method
    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def squash_transform(processor, side: int) -> Transform:
    """``processor`` (a transformers image processor) resizing every image to ``side`` × ``side`` (squash, its own
    resampling and normalisation) with no crop: dymu's one preprocessing of a DINOv2 encoder at an input side,
    the same as the small VLM's processor (``dymu.small_vlm.build_processor``) at 224."""
    import copy

    squashed = copy.deepcopy(processor)
    squashed.size = {"height": int(side), "width": int(side)}
    squashed.do_center_crop = False
    return _HFTransform(squashed)


class SquashResize:
    """PIL image -> ``[3, S, S]``: bicubic resize (squash) to S×S of the 8-bit image, scaled to [0, 1] and normalised
    by ``mean`` / ``std`` (without a transformers processor; :func:`squash_transform` is dymu's DINOv2 path)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = int(size), [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, image) -> Tensor:
        import numpy as np
        from PIL import Image

        resized = load_image(image).resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def describe_preprocess(transform: object) -> str | None:
    """What a transform from :func:`hf_transform` (or a transformers image processor) does to an image's size, in
    words recorded in threshold checkpoints: ``"squash 224x224 bicubic"`` or ``"resize 256, crop 224x224
    bicubic"``; None when it is not known (e.g. an open_clip transform)."""
    if isinstance(transform, SquashResize):
        return f"squash {transform.size}x{transform.size} bicubic"
    processor = getattr(transform, "processor", transform)
    if not hasattr(processor, "do_resize") or not hasattr(processor, "size"):
        return None
    resample = getattr(processor, "resample", None)
    resample = _RESAMPLE.get(int(resample), str(resample)) if resample is not None else "default"
    size, crop, parts = processor.size, getattr(processor, "crop_size", None), []
    if processor.do_resize:
        if _get(size, "height") and _get(size, "width"):
            parts.append(f"squash {_get(size, 'height')}x{_get(size, 'width')}")
        elif _get(size, "shortest_edge"):
            parts.append(f"resize {_get(size, 'shortest_edge')}")
        else:
            return None
    if getattr(processor, "do_center_crop", False) and _get(crop, "height"):
        parts.append(f"crop {_get(crop, 'height')}x{_get(crop, 'width')}")
    return ", ".join(parts) + f" {resample}" if parts else None


def _get(size: object, key: str) -> int | None:
    """An entry of a processor's size (a dict, or transformers 5's ``SizeDict``)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


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
    import numpy as np
    from PIL import Image

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
    from PIL import Image

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
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    return on_white(img, name) if has_alpha(img) else to_rgb(img)


def load_image(image: "str | Path | object"):
    """A decoded RGB PIL image from a path (or a PIL image); FileNotFoundError / ValueError name the bad file.

    The one image reader of dymu (finding, encode, generate, eval, the demo, the lmms-eval task): the EXIF
    orientation is applied (a photo stored sideways is read upright), an alpha channel is composited on white
    (said once), and 16-bit greyscale and float images are scaled to 8 bits, not clipped (see :func:`to_rgb`).
    """
    from PIL import Image, UnidentifiedImageError

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
