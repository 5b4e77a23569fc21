"""Image lists for threshold finding (the authors' JSON list format), their dataset and global batches.

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
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dymu.data.images import Transform, load_image


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
