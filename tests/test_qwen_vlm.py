"""DyMU end to end on tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (weights std 0.3, fp32 on CPU).

The reference for VTU is its definition, written without dymu's VLM code (``reference_logits`` of
tests/test_vtu_mrope.py): per layer every merged token copied to each placeholder it stands for, stock attention at
the M-RoPE positions the stock ``get_rope_index`` gives the *caller's* (unmerged) prompt, outputs averaged per group;
Qwen3-VL's DeepStack features added to the merged visual tokens after the first layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dymu.encoders.qwen_vl import patchify
from dymu.samples import make_image
from dymu.testing import QWEN_IMAGE, QWEN_START, tiny_qwen_vlm
from dymu.vlm import base
from dymu.vlm.qwen_vl import disable_dymu_qwen, enable_dymu_qwen
from test_vtu_mrope import reference_logits

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
MIXED = [(4, 6), (8, 8), (6, 10)]  # (h, w) in patches: 6, 16, 15 placeholders
THRESHOLD = 0.3  # merges on the tiny towers: a flat image keeps 1-2 tokens, a textured one about half
TOL = 1e-4
PAD = 3  # the tiny models' pad_token_id


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_qwen_vlm(request.param)


def pixels(kind: str, h: int, w: int, patch: int, seed: int) -> torch.Tensor:
    img = make_image(kind, 64, seed=seed).resize((w * patch, h * patch))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.25)[None]


def inputs(model, sizes, kinds=None, seed=0, post=(7, 8, 9)) -> dict:
    """Left-padded prompts ``text <vision_start> <image_pad>*(h*w/4) text`` (one image each), as a processor
    makes them: packed patches, grid, ``mm_token_type_ids``."""
    p = model.config.vision_config.patch_size
    kinds = kinds or ["textured"] * len(sizes)
    parts = [patchify(pixels(k, h, w, p, seed + i), p, 2, 2) for i, (k, (h, w)) in enumerate(zip(kinds, sizes))]
    rows = [[5, 6 + i, QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + list(post) for i, (h, w) in enumerate(sizes)]
    n = max(map(len, rows))
    ids = torch.tensor([[PAD] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == QWEN_IMAGE).int(),
                pixel_values=torch.cat([f for f, _ in parts]), image_grid_thw=torch.cat([g for _, g in parts]))


def generate(model, x, steps=4):
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=PAD)
    return out, torch.stack(out.logits, 1)


@pytest.fixture
def dymu_on(model):
    def on(thresholds=THRESHOLD, **kw):
        enable_dymu_qwen(model, [thresholds] * len(model.model.visual.blocks), **kw)
        return model

    yield on
    disable_dymu_qwen(model)


@pytest.mark.parametrize("sizes", [[(4, 6)], [(8, 8)], MIXED])
def test_merging_off_is_the_stock_model(model, dymu_on, sizes):
    x = inputs(model, sizes)
    with torch.no_grad():
        ref = model(**x).logits
    ref_gen, ref_steps = generate(model, x)
    dymu_on(1.0)
    with torch.no_grad():
        out = model(**x)
    gen, steps = generate(model, x)
    assert out.visual_token_counts == [h * w // 4 for h, w in sizes]
    real = x["attention_mask"].bool()  # padding columns' logits mean nothing
    assert torch.allclose(out.logits[real], ref[real], atol=1e-5, rtol=0)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert torch.allclose(steps, ref_steps, atol=1e-4, rtol=0)  # decode: SDPA over a cache, float noise


def test_merging_off_after_save_and_reload(model, tmp_path):
    x = inputs(model, MIXED[:2])
    ref, _ = generate(model, x)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    enable_dymu_qwen(again, [1.0] * len(again.model.visual.blocks))
    out, _ = generate(again, x)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.visual_token_counts == [6, 16]


def definition(model, x, prep: base.Prepared) -> list[torch.Tensor]:
    """Per row the definition's logits ``[M_b, V]`` of the merged prompt (module docstring)."""
    ids, mask = x["input_ids"], x["attention_mask"]
    stock, _ = model.model.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"],
                                          image_grid_thw=x["image_grid_thw"], attention_mask=mask)
    enc = prep.encoded
    embed = model.model.language_model.embed_tokens
    features = iter(enc.features)
    deep = iter(enc.extras.get("deepstack", []))
    rows = []
    for b in range(ids.shape[0]):
        merged = prep.input_ids[b][prep.attention_mask[b].bool()]
        visual = merged == QWEN_IMAGE
        e = embed(merged).clone()
        e[visual] = next(features)  # one image per row
        ds = None
        if "deepstack" in enc.extras:
            ds = (visual, list(next(deep)))
        rows.append(reference_logits(model, e, prep.groups[b], stock[:, b][:, mask[b].bool()], deepstack=ds))
    return rows


def prepared(model, x) -> base.Prepared:
    kwargs = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        return base.prepare_inputs(model, x["input_ids"], x["attention_mask"], x["pixel_values"], kwargs)


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("sizes", [[(8, 8)], MIXED])
def test_vtu_equals_the_definition_prefill_and_decode(model, dymu_on, mode, sizes):
    """Prefill logits and every decode step's logits (teacher-forced on the generated tokens: each new token at the
    previous position + 1 in t, h, w, where stock generate continues) equal the definition."""
    dymu_on(vtu=mode)
    x = inputs(model, sizes, kinds=["textured", "flat", "stripes"][: len(sizes)], seed=3)
    prep = prepared(model, x)
    assert any(g.numel() > int(g.max()) + 1 for g in prep.groups)  # something merged
    want = definition(model, x, prep)
    with torch.no_grad():
        out = model(**x)
    for b, w in enumerate(want):
        got = out.logits[b][out.merged_attention_mask[b].bool()]
        assert float((got - w).abs().max()) <= TOL
    gen, steps = generate(model, x, steps=3)
    assert torch.allclose(steps[:, 0], out.logits[:, -1], atol=TOL, rtol=0)
    ids, mask = x["input_ids"], x["attention_mask"]
    stock, _ = model.model.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"],
                                          image_grid_thw=x["image_grid_thw"], attention_mask=mask)
    embed = model.model.language_model.embed_tokens
    for b in range(len(sizes)):  # decode steps by the definition
        merged = prep.input_ids[b][prep.attention_mask[b].bool()]
        visual = merged == QWEN_IMAGE
        e = embed(merged).clone()
        e[visual] = prep.encoded.features[b]
        g, p = prep.groups[b], stock[:, b][:, mask[b].bool()]
        ds = (visual, list(prep.encoded.extras["deepstack"][b])) if "deepstack" in prep.encoded.extras else None
        for s, tok in enumerate(gen.sequences[b, ids.shape[1]:].tolist()):
            if s:
                ref = reference_logits(model, e, g, p, deepstack=None if ds is None else
                                       (torch.cat([ds[0], torch.zeros(s, dtype=torch.bool)]), ds[1]))[-1]
                assert float((steps[b, s] - ref).abs().max()) <= TOL, (b, s)
            e = torch.cat([e, embed.weight[tok][None]])
            g = torch.cat([g, g.max()[None] + 1])
            p = torch.cat([p, p[:, -1:] + 1], 1)
    assert gen.visual_token_counts == out.visual_token_counts


def test_batch_equals_one_by_one_and_counts_follow_content(model, dymu_on):
    dymu_on()
    x = inputs(model, MIXED, kinds=["flat", "textured", "textured"], seed=5)
    batch, steps = generate(model, x)
    counts = batch.visual_token_counts
    assert counts[0] < counts[1] / 2  # a flat image keeps far fewer than a textured one of similar size
    for b, size in enumerate(MIXED):
        one = inputs(model, [size], kinds=[["flat", "textured", "textured"][b]], seed=5 + b)
        one["input_ids"][0, 1] = 6 + b
        alone, alone_steps = generate(model, one)
        assert alone.visual_token_counts == [counts[b]]
        n = one["input_ids"].shape[1]
        assert torch.equal(alone.sequences[0, n:], batch.sequences[b, x["input_ids"].shape[1]:])
        assert torch.allclose(alone_steps[0], steps[b], atol=TOL, rtol=0)


def test_bad_input(model, dymu_on):
    dymu_on()
    x = inputs(model, [(4, 6)])
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**{k: v for k, v in x.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(**x, pixel_values_videos=x["pixel_values"])


def _merged_count_positions(self, model, prepared):
    """Wrong: every virtual token at its merged slot's index (positions from the merged count)."""
    return [torch.arange(int(g.max()) + 1)[g].expand(3, -1) for g in prepared.groups]


def _text_shifted(right):
    def positions(self, model, prepared):
        """Wrong: the text after an image shifted back by what merging removed (start + merged count)."""
        out = []
        for g, p in zip(prepared.groups, right(self, model, prepared)):
            row = prepared.input_ids[len(out)][prepared.attention_mask[len(out)].bool()][g]
            after = torch.arange(g.numel()) > int((row == QWEN_IMAGE).nonzero().max())
            out.append(p - after.long() * (g.numel() - int(g.max()) - 1))
        return out
    return positions


def _deepstack_regrouped(right):
    def feature_kwargs(self, enc):
        """Wrong: DeepStack features not in the merged tokens' slots (reversed)."""
        enc = base.EncodedImages(enc.features, enc.groups,
                                 extras={"deepstack": [d.flip(1) for d in enc.extras["deepstack"]]})
        return right(self, enc)
    return feature_kwargs


@pytest.mark.parametrize("variant", ["merged_count", "text_shifted", "deepstack"])
def test_comparison_catches_wrong_variants(model, dymu_on, variant, monkeypatch):
    from dymu.vlm.qwen_vl import QwenFamily

    if variant == "deepstack" and model.config.model_type != "qwen3_vl":
        pytest.skip("DeepStack is Qwen3-VL's")
    dymu_on()
    x = inputs(model, MIXED[1:], kinds=["textured", "stripes"], seed=3)
    want = definition(model, x, prepared(model, x))
    if variant == "merged_count":
        monkeypatch.setattr(QwenFamily, "unmerged_positions", _merged_count_positions)
    elif variant == "text_shifted":
        monkeypatch.setattr(QwenFamily, "unmerged_positions", _text_shifted(QwenFamily.unmerged_positions))
    else:
        monkeypatch.setattr(QwenFamily, "feature_kwargs", _deepstack_regrouped(QwenFamily.feature_kwargs))
    with torch.no_grad():
        out = model(**x)
    err = max(float((out.logits[b][out.merged_attention_mask[b].bool()] - w).abs().max()) for b, w in enumerate(want))
    assert err > 100 * TOL


def test_mm_token_type_ids_collapse_with_the_ids(model, dymu_on):
    """The stock call gets ``mm_token_type_ids`` on the merged layout (what generate extends and the stock
    position code reads when no positions are given)."""
    dymu_on()
    x = inputs(model, MIXED, kinds=["flat", "textured", "stripes"])
    kwargs = {"mm_token_type_ids": x["mm_token_type_ids"], "image_grid_thw": x["image_grid_thw"]}
    with torch.no_grad():
        prep = base.prepare_inputs(model, x["input_ids"], x["attention_mask"], x["pixel_values"], kwargs)
    assert prep.input_ids.shape[1] < x["input_ids"].shape[1]
    assert torch.equal(kwargs["mm_token_type_ids"], (prep.input_ids == QWEN_IMAGE).long() * prep.attention_mask)


def test_vtu_off_keeps_each_token_at_its_stock_position(model, dymu_on):
    """VTU off: each merged token at its representative's stock (t, h, w); with merging off that is the stock
    model (1-D positions counted over the merged sequence would not be)."""
    x = inputs(model, MIXED)
    ref, ref_steps = generate(model, x)
    dymu_on(1.0, vtu="off")
    out, steps = generate(model, x)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.allclose(steps, ref_steps, atol=TOL, rtol=0)
