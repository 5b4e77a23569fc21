"""Encoder identities and the authors' DyMU encoder names.

An *identity* names an encoder architecture (``ViT-L-14-336``); threshold
checkpoints record it so that thresholds are never applied to another encoder.
Known real shapes get the authors' names; other shapes (tiny test models) get a
descriptive one built from their dimensions.
"""

from __future__ import annotations

# (family, image size, patch size, hidden size) -> identity
KNOWN_ENCODERS: dict[tuple[str, int, int, int], str] = {
    ("clip", 336, 14, 1024): "ViT-L-14-336",
    ("siglip", 384, 14, 1152): "siglip-so400m-patch14-384",
}


def encoder_identity(family: str, image_size: int, patch_size: int, hidden_size: int) -> str:
    key = (family, int(image_size), int(patch_size), int(hidden_size))
    return KNOWN_ENCODERS.get(key, f"{family}-{image_size}px-p{patch_size}-d{hidden_size}")
