"""LLaVA-OneVision with DyMU (dymu.vlm.onevision) on a tiny random stock model (SigLIP + Qwen2, std-0.3 weights).

The model is built from configs, saved and reloaded. The VTU definition used as the reference is built
independently of dymu's layout code: the merged tokens (``dymu.encode`` features + source maps) are expanded to
every patch of every crop, then the *stock* ``pack_image_features`` lays them out (base crop, stitched tiles,
unpadding, ``image_newline``) and the stock full-length prompt is filled with them; stock Qwen2 layers then run on
the full length with a group mean per layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import (
    image_size_to_num_patches,
)

import dymu
from dymu.samples import make_image
from dymu.testing import plain_attention
from dymu.thresholds import ThresholdCheckpoint
from dymu.vlm import dymu_vtu_mode, onevision as ov
from dymu.testing import tiny_onevision
from dymu.vlm.onevision import (
    disable_dymu_onevision,
    enable_dymu_onevision,
)

THRESHOLDS = [0.6, 0.6, 0.6]  # tiny SigLIP has 3 blocks; merges a lot, differently per crop


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, processor = tiny_onevision()
    path = tmp_path_factory.mktemp("ov")
    model.save_pretrained(path)
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    return reloaded, processor


@pytest.fixture
def model(tiny):
    m, _ = tiny
    yield m
    disable_dymu_onevision(m)


def images():
    # sizes (W, H): 2×3-tile grid unpadded in width, a square 2×2, a wide 3×1 and one image of one tile
    return [
        make_image("textured", 40, seed=1).resize((40, 60)),
        make_image("textured", 56, seed=2),
        make_image("flat", 30, seed=3).resize((84, 30)),
        make_image("textured", 28, seed=4),
    ]


def inputs(processor, imgs=None, texts=None):
    imgs = images()[:2] if imgs is None else imgs
    texts = ["w1 <image> w2", "w3 w4 w5 <image> w6"][: len(imgs)] if texts is None else texts
    return processor(images=imgs, text=texts, return_tensors="pt", padding=True)


def stock_positions(inp):
    return (inp["attention_mask"].cumsum(1) - 1).clamp(min=0)


def unpad(logits, mask):
    return [row[m.bool()] for row, m in zip(logits, mask)]


def maxdiff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# Reference: the VTU definition on the stock layout, independent of dymu.vlm.onevision's bookkeeping
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logits(model, embeds, groups):
    """VTU by definition: merged ``embeds [M, C]`` copied to virtual positions ``groups [N]``, stock Qwen2 math."""
    dec = model.model.language_model
    m, n = embeds.shape[0], groups.numel()
    sizes = torch.bincount(groups, minlength=m).float()[None, :, None]
    h = embeds[None]
    for layer in dec.layers:
        x = layer.input_layernorm(h)[:, groups]
        cos, sin = dec.rotary_emb(x, torch.arange(n)[None])
        a = plain_attention(layer.self_attn, x, cos, sin)
        a = torch.zeros(1, m, a.shape[-1]).index_add_(1, groups, a) / sizes
        h = h + layer.self_attn.o_proj(a)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(dec.norm(h))[0]


@torch.no_grad()
def reference_rows(model, inp):
    """Per prompt row: (merged embeds [M, C], groups [N]) by the definition on the stock layout."""
    inner = model.model
    cfg = model.config
    sizes = inp["image_sizes"]
    bni = inp.get("batch_num_images")
    need = [True] * len(sizes) if bni is None else [int(n) == 1 for n in bni for _ in range(int(n))]
    crops = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
        for s, p in zip(sizes, need)
    ]
    flat = torch.cat([pv[:n] for pv, n in zip(inp["pixel_values"], crops)])
    enc = dymu.encode(inner.vision_tower, flat, layer=cfg.vision_feature_layer)
    feats, ids, offset, c0 = [], [], 0, 0
    for n in crops:
        f, i = [], []
        for c in range(c0, c0 + n):
            proj = inner.multi_modal_projector(enc.features[c])
            f.append(proj[enc.source_maps[c]])  # every patch gets the merged token covering it
            i.append((enc.source_maps[c] + offset).double()[:, None])
            offset += enc.features[c].shape[0]
        feats.append(torch.stack(f))
        ids.append(torch.stack(i))
        c0 += n
    packed, _ = inner.pack_image_features(feats, sizes, image_newline=inner.image_newline)
    packed_ids, _ = inner.pack_image_features(ids, sizes, image_newline=torch.full((1,), -1.0, dtype=torch.float64))
    full_feats = torch.cat(packed)
    keys_img = torch.cat([k[:, 0] for k in packed_ids]).round().long()
    embeds_all = inner.get_input_embeddings()(inp["input_ids"])
    image_pos = inp["input_ids"] == cfg.image_token_id
    assert int(image_pos.sum()) == full_feats.shape[0]
    embeds_all[image_pos] = full_feats
    keys_all = torch.full(inp["input_ids"].shape, -1, dtype=torch.long)
    keys_all[image_pos] = keys_img
    rows, unique = [], 10**9
    for b in range(inp["input_ids"].shape[0]):
        real = inp["attention_mask"][b].bool()
        e, k = embeds_all[b][real], keys_all[b][real].clone()
        for p in (k == -1).nonzero().flatten().tolist():  # text tokens and newlines: groups of one
            k[p] = unique = unique + 1
        uniq, inv = torch.unique(k, return_inverse=True)
        first = torch.full((uniq.numel(),), k.numel()).scatter_reduce(0, inv, torch.arange(k.numel()), "amin")
        order = first.argsort()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        rows.append((e[first[order]], rank[inv]))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vtu", ["fast", "off"])
def test_merging_off_equals_stock_logits_and_generation(tiny, model, vtu):
    _, processor = tiny
    cases = [
        inputs(processor, images()[:1], ["w1 <image> w2"]),  # one image
        inputs(processor, images(), ["w1 <image>", "w2 w3 <image> w4", "<image> w5", "w6 w7 w8 <image>"]),
    ]
    refs = []
    with torch.no_grad():
        for inp in cases:
            logits = model(**inp, position_ids=stock_positions(inp)).logits
            new = model.generate(**inp, max_new_tokens=4, do_sample=False)
            refs.append((logits, new))
    enable_dymu_onevision(model, None, vtu=vtu)
    with torch.no_grad():
        for inp, (logits, new) in zip(cases, refs):
            out = model(**inp)
            assert out.logits.shape == logits.shape
            assert float((out.logits - logits).abs().max()) <= 1e-6
            assert torch.equal(model.generate(**inp, max_new_tokens=4, do_sample=False), new)
            stock_counts = (inp["input_ids"] == model.config.image_token_id).sum().item()
            assert sum(out.visual_token_counts) == stock_counts


def test_multi_crop_image_keeps_different_counts_per_crop(tiny, model):
    _, processor = tiny
    enable_dymu_onevision(model, THRESHOLDS)
    with torch.no_grad():
        crop_counts = model(**inputs(processor)).crop_token_counts
    assert len(crop_counts[0]) == 7  # base + 2×3 tiles
    assert len(set(crop_counts[0])) > 1
    full = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert max(max(c) for c in crop_counts) < full


@torch.no_grad()
def test_equals_vtu_definition(tiny, model):
    _, processor = tiny
    enable_dymu_onevision(model, THRESHOLDS, vtu="fast")
    # one row with two anyres images, one with a multi-image prompt (base crop + newline per image)
    for inp in (
        inputs(processor, [images()[0], images()[2]], ["w1 <image> w2 <image> w3"]),
        inputs(processor, [[images()[1], images()[3]]], ["w1 <image> w2 <image>"]),
    ):
        out = model(**inp)
        got = unpad(out.logits, out.merged_attention_mask)
        ref = [reference_logits(model, e, g) for e, g in reference_rows(model, inp)]
        assert [r.shape for r in ref] == [g.shape for g in got]
        assert maxdiff(got, ref) <= 1e-4
        assert sum(out.visual_token_counts) < (inp["input_ids"] == model.config.image_token_id).sum()


@torch.no_grad()
def test_wrong_position_map_fails_the_definition(tiny, model, monkeypatch):
    _, processor = tiny
    stock = ov.stock_layout
    hw = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2

    def shifted(model_, num_crops, image_size, **kw):  # tiles' groups shifted by one tile
        codes = stock(model_, num_crops, image_size, **kw)
        tile = codes >= hw
        return torch.where(tile, hw + (codes - hw + hw) % ((num_crops - 1) * hw), codes)

    enable_dymu_onevision(model, THRESHOLDS, vtu="fast")
    inp = inputs(processor, [images()[0]], ["w1 <image> w2"])
    ref = [reference_logits(model, e, g) for e, g in reference_rows(model, inp)]
    monkeypatch.setattr(ov, "stock_layout", shifted)
    out = model(**inp)
    got = unpad(out.logits, out.merged_attention_mask)
    assert got[0].shape != ref[0].shape or maxdiff(got, ref) > 0.1  # measured 12.4


@torch.no_grad()
def test_definition_comparison_is_sensitive(tiny, model):
    """Merged tokens at consecutive positions (no VTU) are far from the definition: the test sees positions."""
    _, processor = tiny
    enable_dymu_onevision(model, THRESHOLDS, vtu="off")
    inp = inputs(processor, [images()[0]], ["w1 <image> w2"])
    out = model(**inp)
    got = unpad(out.logits, out.merged_attention_mask)
    ref = [reference_logits(model, e, g) for e, g in reference_rows(model, inp)]
    assert maxdiff(got, ref) > 0.1  # measured ~9.7


@torch.no_grad()
def test_fast_equals_exact_prefill_and_every_decode_step(tiny, model):
    _, processor = tiny
    inp = inputs(processor, images()[:3], ["w1 <image> w2", "w3 <image> w4 w5 w6", "<image> w7"])
    results = {}
    for mode in ("fast", "exact"):
        enable_dymu_onevision(model, THRESHOLDS, vtu=mode)
        logits = model(**inp).logits
        gen = model.generate(**inp, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        results[mode] = (logits, gen)
        disable_dymu_onevision(model)
    (lf, gf), (le, ge) = results["fast"], results["exact"]
    assert float((lf - le).abs().max()) <= 1e-4
    assert torch.equal(gf.sequences, ge.sequences)
    assert gf.sequences.shape[1] == inp["input_ids"].shape[1] + 5
    assert len(gf.logits) == 5
    assert max(float((a - b).abs().max()) for a, b in zip(gf.logits, ge.logits)) <= 1e-4
    # the first step's logits are the forward's last-position logits
    assert float((gf.logits[0] - lf[:, -1]).abs().max()) <= 1e-4


@torch.no_grad()
def test_decode_steps_equal_the_definition(tiny, model):
    _, processor = tiny
    enable_dymu_onevision(model, THRESHOLDS, vtu="fast")
    inp = inputs(processor, [images()[0]], ["w1 <image> w2"])
    gen = model.generate(**inp, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    (embeds, groups), = reference_rows(model, inp)
    emb = model.model.get_input_embeddings()
    new = gen.sequences[0, inp["input_ids"].shape[1] :]
    for t in range(4):
        ref = reference_logits(model, embeds, groups)[-1]
        assert float((gen.logits[t][0] - ref).abs().max()) <= 1e-4, t
        embeds = torch.cat([embeds, emb(new[t : t + 1])])
        groups = torch.cat([groups, groups.max()[None] + 1])


@torch.no_grad()
def test_batch_equals_one_by_one(tiny, model):
    _, processor = tiny
    enable_dymu_onevision(model, THRESHOLDS, vtu="fast")
    imgs, texts = images()[:3], ["w1 <image> w2", "w3 <image> w4 w5 w6", "<image> w7"]
    batch = inputs(processor, imgs, texts)
    out = model(**batch)
    logits, counts = unpad(out.logits, out.merged_attention_mask), out.crop_token_counts
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    gen = model.generate(**batch, **kw)
    for b in range(3):
        one = inputs(processor, [imgs[b]], [texts[b]])
        out_one = model(**one)
        alone = out_one.logits[0]
        assert out_one.crop_token_counts == [counts[b]]
        assert float((alone - logits[b]).abs().max()) <= 1e-4
        g1 = model.generate(**one, **kw)
        new = g1.sequences[0, one["input_ids"].shape[1] :]  # may stop early at EOS
        assert torch.equal(new, gen.sequences[b, batch["input_ids"].shape[1] :][: new.numel()])
        assert max(float((l1[0] - lb[b]).abs().max()) for l1, lb in zip(g1.logits, gen.logits)) <= 1e-4


@torch.no_grad()
def test_per_crop_batching_equals_the_padded_crop_batch(tiny, model):
    """crop_batching="per_image" (one tower call per crop, no padding) gives the padded batch's counts and
    logits."""
    _, processor = tiny
    inp = inputs(processor, images()[:3], ["w1 <image> w2", "w3 <image> w4 w5 w6", "<image> w7"])
    results = {}
    for batching in ("padded", "per_image"):
        enable_dymu_onevision(model, THRESHOLDS, vtu="fast", crop_batching=batching)
        out = model(**inp)
        results[batching] = (out.logits, out.crop_token_counts)
        disable_dymu_onevision(model)
    (padded, counts), (per_crop, counts_pc) = results["padded"], results["per_image"]
    assert counts_pc == counts and len({c for image in counts for c in image}) > 2
    assert float((padded - per_crop).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="crop_batching must be"):
        enable_dymu_onevision(model, THRESHOLDS, crop_batching="packed")


def test_downsampled_layout(tiny, model):
    _, processor = tiny
    big = make_image("textured", 112, seed=5)  # 4×4 tiles: past anyres_max_9, the stock model downsamples
    inp = inputs(processor, [big], ["w1 <image>"])
    n_stock = int((inp["input_ids"] == model.config.image_token_id).sum())
    hw = 16
    layout = ov.stock_layout(model, 17, inp["image_sizes"][0])
    assert layout.numel() == n_stock  # same placeholder count as the processor's
    newline = layout == ov.NEWLINE
    assert int(newline[:hw].sum()) == 0 and bool((layout[:hw] == torch.arange(hw)).all())
    assert bool((layout[~newline] < 17 * hw).all())
    with pytest.raises(ValueError, match="downsamples this image"):
        ov.stock_layout(model, 17, inp["image_sizes"][0], downsample="error")
    enable_dymu_onevision(model, THRESHOLDS, downsample="nearest")
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    # downsampled: fewer stock positions than the 17 crops' unlimited layout (same count as the processor's)
    assert out.visual_token_counts[0] <= n_stock < ov._pack_codes(model, 17, inp["image_sizes"][0], ov._NO_LIMIT).numel()
    disable_dymu_onevision(model)
    enable_dymu_onevision(model, THRESHOLDS, downsample="error")
    with pytest.raises(ValueError, match="downsamples this image"):
        model(**inp)


def test_bad_input(tiny, model):
    _, processor = tiny
    inp = inputs(processor)
    # thresholds found for another encoder
    clip = ThresholdCheckpoint(torch.full((3,), 0.5), encoder="clip-28px-p7-d32")
    with pytest.raises(ValueError, match="are for encoder"):
        enable_dymu_onevision(model, clip)
    assert dymu_vtu_mode(model) is None
    with pytest.raises(ValueError, match="3 blocks"):
        enable_dymu_onevision(model, [0.5] * 24)
    enable_dymu_onevision(model, THRESHOLDS)
    with pytest.raises(ValueError, match="already enabled"):
        enable_dymu_onevision(model, THRESHOLDS)
    # video
    with pytest.raises(ValueError, match="video is not supported with DyMU yet.*pixel_values_videos"):
        model(**inp, pixel_values_videos=torch.zeros(1, 2, 3, 28, 28))
    with pytest.raises(ValueError, match="video is not supported"):
        model.generate(input_ids=inp["input_ids"], pixel_values_videos=torch.zeros(1, 2, 3, 28, 28))
    # more images than placeholders / more placeholders than images
    one_row = {k: (v[:1] if k in ("input_ids", "attention_mask") else v) for k, v in inp.items()}
    with pytest.raises(ValueError, match="2 images were given but the prompts hold placeholders for 1"):
        model(**one_row)
    extra = dict(inp, input_ids=inp["input_ids"].clone())
    extra["input_ids"][1, -1] = model.config.image_token_id
    with pytest.raises(ValueError, match="more image placeholders|placeholder tokens"):
        model(**extra)
    # image sizes the anyres grid cannot handle (a size the processed crops were not made for)
    wrong = dict(inp, image_sizes=torch.tensor([[112, 112], [56, 56]]))  # would need 1 + 4×4 crops, 7 given
    with pytest.raises(ValueError, match="needs 17 crops for its size"):
        model(**wrong)
    model.config.image_grid_pinpoints = [[28, 28], [28, 50]]  # a pinpoint that is no multiple of the crop
    try:
        with pytest.raises(ValueError, match="does not fit the anyres grid"):
            model(**inputs(processor, [images()[2]], ["w1 <image>"]))
    finally:
        model.config.image_grid_pinpoints = processor.image_processor.image_grid_pinpoints
    disable_dymu_onevision(model)
    with pytest.raises(ValueError, match="expects a LlavaOnevisionForConditionalGeneration"):
        enable_dymu_onevision(model.model, THRESHOLDS)


def test_disable_restores_stock(tiny, model):
    _, processor = tiny
    inp = inputs(processor)
    with torch.no_grad():
        before = model(**inp).logits
        enable_dymu_onevision(model, THRESHOLDS, vtu="exact")
        model(**inp)
        disable_dymu_onevision(model)
        after = model(**inp).logits
    assert type(model) is LlavaOnevisionForConditionalGeneration
    assert not hasattr(model.model.vision_tower, "_dymu_state")
    assert torch.equal(before, after)
