"""Tiny random encoders of every supported family, saved to disk and loaded back through dymu's real loading
code (``from_pretrained`` / open_clip ``local-dir:``), plus what the tests need to run their stock blocks.

Weights are re-drawn with std 0.3 (at default init attention is near-uniform and bugs hide).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dymu.encoders.loading import load_encoder
from dymu.samples import make_image
from dymu.testing import scale_weights

SIZE = 84  # 6 x 6 patches of 14 px
LAYERS = 4
HIDDEN = 64


@dataclass
class Family:
    """A loaded tiny encoder and handles on its stock pieces."""

    name: str
    model: nn.Module
    preprocess: Callable
    has_cls: bool
    blocks: Callable[[nn.Module], list]
    embed: Callable[[nn.Module, Tensor], Tensor]  # pixels -> first block input (stock)
    attn_part: Callable[[nn.Module, Tensor], Tensor]  # block, x -> attention branch (added to x)
    mlp_part: Callable[[nn.Module, Tensor], Tensor]  # block, h -> MLP branch (added to h)
    pooled: Callable[[nn.Module, Tensor], Tensor]  # model, pixels -> the model's pooled output
    pool_last: Callable[[nn.Module, Tensor], Tensor] | None = None  # model, last hidden [B, N, C] -> pooled (stock)

    def pixels(self, images: list[Image.Image]) -> Tensor:
        return torch.stack([self.preprocess(im) for im in images])

    def stock_hidden(self, x: Tensor) -> list[Tensor]:
        """Hidden states 0..L of the (unpatched) model, by running its stock blocks."""
        h = self.embed(self.model, x)
        out = [h]
        for block in self.blocks(self.model):
            h = h + self.attn_part(block, h)
            h = h + self.mlp_part(block, h)
            out.append(h)
        return out


def images(size: int = SIZE) -> dict[str, Image.Image]:
    """Real photos (scikit-image) and generated images of very different complexity."""
    from skimage import data

    def photo(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).convert("RGB").resize((size, size), Image.BICUBIC)

    return {
        "camera": photo(data.camera()),
        "astronaut": photo(data.astronaut()),
        "flat": make_image("flat", size),
        "textured": make_image("textured", size, seed=1),
        "gradient": make_image("gradient", size),
        "chelsea": photo(data.chelsea()),
    }


def finding_images(size: int = SIZE) -> dict[str, Image.Image]:
    """Other images to find thresholds on: a threshold equals one edge's score on the batch it was found on, so
    strict-threshold checks run on :func:`images`, never on these."""
    from skimage import data

    def photo(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).convert("RGB").resize((size, size), Image.BICUBIC)

    return {
        "coffee": photo(data.coffee()),
        "rocket": photo(data.rocket()),
        "coins": photo(data.coins()),
        "flat2": make_image("flat", size, seed=7),
        "stripes": make_image("stripes", size, seed=3),
        "textured2": make_image("textured", size, seed=8),
    }


# ------------------------------------------------------------------ transformers
def save_hf_clip(directory: Path, *, std: float | None = 0.3, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        image_size=SIZE, patch_size=14,
    )
    model = CLIPVisionModel(config)
    if std:
        scale_weights(model, std, seed)
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=SIZE).save_pretrained(directory)
    return directory


def save_hf_siglip(directory: Path, *, std: float | None = 0.3, seed: int = 0) -> Path:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        image_size=SIZE, patch_size=14,
    )
    model = SiglipVisionModel(config)
    if std:
        scale_weights(model, std, seed)
    model.save_pretrained(directory)
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(directory)
    return directory


def hf_family(name: str, directory: Path) -> Family:
    loaded = load_encoder(str(directory))
    model = loaded.model

    def embed(m, x):
        h = m.embeddings(x)
        return m.pre_layrnorm(h) if hasattr(m, "pre_layrnorm") else h

    def pooled(m, x):
        return m(pixel_values=x).pooler_output

    def pool_last(m, h):
        if name == "hf-clip":
            return m.post_layernorm(h[:, 0])
        return m.head(m.post_layernorm(h))

    return Family(
        name,
        model,
        loaded.preprocess,
        name == "hf-clip",
        blocks=lambda m: list(m.encoder.layers),
        embed=embed,
        attn_part=lambda b, x: b.self_attn(hidden_states=b.layer_norm1(x))[0],
        mlp_part=lambda b, h: b.mlp(b.layer_norm2(h)),
        pooled=pooled,
        pool_last=pool_last,
    )


# ------------------------------------------------------------------ open_clip
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def save_open_clip(directory: Path, *, std: float | None = 0.3, seed: int = 0, pool_type: str = "tok") -> Path:
    from open_clip.model import CLIP

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "layers": LAYERS, "width": HIDDEN, "head_width": 16, "patch_size": 14, "image_size": SIZE,
            "ls_init_value": 0.5, "pool_type": pool_type,
        },
        "text_cfg": TEXT_CFG,
    }
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    if std:
        scale_weights(model, std, seed)
    _save_open_clip(directory, cfg, model)
    return directory


TIMM_NAME = "dymu_test_tiny_siglip"


def register_timm_siglip() -> None:
    """A tiny SigLIP-style timm ViT (no CLS, attention-pool 'map' head) under :data:`TIMM_NAME`."""
    from timm.models import is_model, register_model
    from timm.models.vision_transformer import VisionTransformer

    if is_model(TIMM_NAME):
        return

    def dymu_test_tiny_siglip(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's, not the ViT's
            kwargs.pop(key, None)
        kwargs = {"global_pool": "map", **kwargs}
        return VisionTransformer(
            img_size=SIZE, patch_size=14, embed_dim=HIDDEN, depth=LAYERS, num_heads=4, mlp_ratio=2,
            class_token=False, qkv_bias=True, init_values=0.5, **kwargs,
        )

    dymu_test_tiny_siglip.__name__ = TIMM_NAME
    register_model(dymu_test_tiny_siglip)


def save_open_clip_siglip(directory: Path, *, std: float | None = 0.3, seed: int = 0) -> Path:
    from open_clip.model import CLIP

    register_timm_siglip()
    cfg = {
        "embed_dim": HIDDEN,
        "vision_cfg": {"image_size": SIZE, "timm_model_name": TIMM_NAME, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": TEXT_CFG,
    }
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    if std:
        scale_weights(model, std, seed)
    _save_open_clip(directory, cfg, model)
    return directory


def _save_open_clip(directory: Path, cfg: dict, model: nn.Module) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))


def open_clip_family(directory: Path) -> Family:
    loaded = load_encoder(f"open_clip:local-dir:{directory}")

    def blocks(m):
        return list(m.transformer.resblocks)

    def attn_part(b, x):
        if not b.attn.batch_first:
            return b.ls_1(b.attention(b.ln_1(x).transpose(0, 1))).transpose(0, 1)
        return b.ls_1(b.attention(b.ln_1(x)))

    def pool_last(m, h):
        pooled, _ = m._pool(h)
        return pooled @ m.proj

    return Family(
        "open_clip",
        loaded.model,
        loaded.preprocess,
        True,
        blocks=blocks,
        embed=lambda m, x: m._embeds(x),
        attn_part=attn_part,
        mlp_part=lambda b, h: b.ls_2(b.mlp(b.ln_2(h))),
        pooled=lambda m, x: m(x),
        pool_last=pool_last,
    )


def timm_family(directory: Path) -> Family:
    register_timm_siglip()
    loaded = load_encoder(f"open_clip:local-dir:{directory}")

    def embed(m, x):
        t = m.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))

    def pool_last(m, h):
        return m.head(m.trunk.forward_head(m.trunk.norm(h)))

    return Family(
        "open_clip-siglip(timm)",
        loaded.model,
        loaded.preprocess,
        False,
        blocks=lambda m: list(m.trunk.blocks),
        embed=embed,
        attn_part=lambda b, x: b.drop_path1(b.ls1(b.attn(b.norm1(x)))),
        mlp_part=lambda b, h: b.drop_path2(b.ls2(b.mlp(b.norm2(h)))),
        pooled=lambda m, x: m(x),
        pool_last=pool_last,
    )


def build(name: str, root: Path) -> Family:
    """Save the tiny ``name`` encoder under ``root`` and load it back."""
    directory = root / name
    if name == "hf-clip":
        return hf_family(name, save_hf_clip(directory))
    if name == "hf-siglip":
        return hf_family(name, save_hf_siglip(directory))
    if name == "open_clip":
        return open_clip_family(save_open_clip(directory))
    if name == "open_clip-siglip":
        return timm_family(save_open_clip_siglip(directory))
    raise ValueError(name)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# open_clip and timm are optional extras: their families are tested where they are installed
FAMILIES = ["hf-clip", "hf-siglip"]
if _importable("open_clip"):
    FAMILIES.append("open_clip")
    if _importable("timm"):
        FAMILIES.append("open_clip-siglip")
