"""Images in, pixel tensors out: reading images (:mod:`dymu.data.images`), image lists and their batches for
threshold finding (:mod:`dymu.data.image_lists`), preprocessing transforms (:mod:`dymu.data.transforms`)."""

from dymu.data.image_lists import (
    Batch,
    GlobalBatchSampler,
    ImageList,
    ImageListDataset,
    Item,
    batches,
    collate,
    ignore_stop_signals,
    read_image_list,
    read_json,
    shard,
)
from dymu.data.images import Transform, has_alpha, load_image, load_images, on_white, to_rgb
from dymu.data.transforms import SquashResize, describe_preprocess, hf_transform, size_entry, squash_transform

__all__ = [
    "Batch", "GlobalBatchSampler", "ImageList", "ImageListDataset", "Item", "batches", "collate",
    "ignore_stop_signals", "read_image_list", "read_json", "shard",
    "Transform", "has_alpha", "load_image", "load_images", "on_white", "to_rgb",
    "SquashResize", "describe_preprocess", "hf_transform", "size_entry", "squash_transform",
]
