"""The baselines of dymu.baselines through the one VLM path, and the counts every call reports.

Tiny random LLaVA-1.5 (CLIP tower with a CLS token, 4×4 patches; weights std 0.3) and LLaVA-OneVision.
"""

from __future__ import annotations

import pytest
import torch

from dymu.samples import make_image
from dymu.testing import tiny_llava, tiny_onevision
from dymu.vlm import disable_dymu, enable_dymu, generate_with_counts, vlm_state
from dymu.vlm.llava import LLAVA
from dymu.vlm.onevision import enable_dymu_onevision

IMAGES = [make_image("flat", 64, 0), make_image("textured", 64, 1), make_image("stripes", 64, 2)]
TEXTS = ["USER: <image> w1 w2 ASSISTANT:", "USER: <image> w3 ASSISTANT:", "USER: w5 <image> w6 w7 w8 ASSISTANT:"]
K = 5


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_llava(image_size=56)
    inputs = processor(images=IMAGES, text=TEXTS, return_tensors="pt", padding=True)
    return model.eval(), processor, inputs


def stock_features(model, pixel_values):
    """The feature layer's patch features (CLS dropped) and the CLS token's attention over the patches in the block
    that produced them, from the tower's own eager attention weights (heads averaged)."""
    tower = model.model.vision_tower
    before = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        tower.set_attn_implementation(before)
    index = model.config.vision_feature_layer % len(out.hidden_states)
    cls = out.attentions[index - 1][:, :, 0, 1:].mean(1)  # attentions[l] is block l's, producing hidden state l+1
    return out.hidden_states[index][:, 1:], cls


def encoded(model, inputs, **call):
    """The family adapter's encoding of ``inputs``' images under the model's method."""
    with torch.no_grad():
        return LLAVA.encode(model, inputs["pixel_values"], dict(call), vlm_state(model))


def test_prune_keeps_the_highest_cls_attention_patches_in_spatial_order(tiny):
    model, _, inputs = tiny
    feats, cls = stock_features(model, inputs["pixel_values"])
    enable_dymu(model, method="prune", token_budget=K)
    try:
        assert vlm_state(model).vtu == "off"
        enc = encoded(model, inputs)
    finally:
        disable_dymu(model)
    with torch.no_grad():
        for b in range(3):
            keep = sorted(cls[b].argsort(descending=True)[:K].tolist())  # top-K, then spatial (raster) order
            want = model.model.multi_modal_projector(feats[b, keep])
            torch.testing.assert_close(enc.features[b], want, atol=1e-4, rtol=1e-4)  # eager vs SDPA tower
            # every stock placeholder position maps to a kept slot: the run collapses to K tokens
            assert enc.groups[b].numel() == 16 and int(enc.groups[b].max()) + 1 == K
    # the kept sets differ between images (the selection follows the image)
    assert len({tuple(sorted(cls[b].argsort(descending=True)[:K].tolist())) for b in range(3)}) > 1


def test_random_is_seeded_and_reproducible(tiny):
    model, _, inputs = tiny
    feats, _ = stock_features(model, inputs["pixel_values"])
    enable_dymu(model, method="random", token_budget=K, seed=7)
    try:
        first, again = encoded(model, inputs), encoded(model, inputs)
        seeded = encoded(model, inputs, selection_seeds=[11, 12, 13])
        with pytest.raises(ValueError, match="selection_seeds has 2 seeds for 3 images"):
            encoded(model, inputs, selection_seeds=[1, 2])
    finally:
        disable_dymu(model)
    with torch.no_grad():
        for b, seed in enumerate([7, 8, 9]):  # image i of a call: seed + i
            assert torch.equal(first.features[b], again.features[b])
            keep = torch.randperm(16, generator=torch.Generator().manual_seed(seed))[:K].sort().values
            torch.testing.assert_close(first.features[b], model.model.multi_modal_projector(feats[b, keep]),
                                       atol=1e-4, rtol=1e-4)  # eager vs SDPA tower
            keep = torch.randperm(16, generator=torch.Generator().manual_seed(11 + b))[:K].sort().values
            torch.testing.assert_close(seeded.features[b], model.model.multi_modal_projector(feats[b, keep]),
                                       atol=1e-4, rtol=1e-4)
    assert not torch.equal(first.features[0], seeded.features[0])


@pytest.mark.parametrize("method", ["tome", "prune", "random"])
def test_each_method_keeps_the_budget_and_reports_it_with_the_call(tiny, method):
    model, _, inputs = tiny
    enable_dymu(model, method=method, token_budget=K)
    try:
        with torch.no_grad():
            out = model(**inputs)
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        assert out.visual_token_counts == [K] * 3 and gen.visual_token_counts == [K] * 3
        # forward numbers the merged tokens as generate does (VTU off for the selections: from the attention mask),
        # so the padded rows' last logits agree
        torch.testing.assert_close(gen.logits[0], out.logits[:, -1], atol=1e-4, rtol=1e-4)
        # the language model reads each prompt with its 16 placeholders collapsed to K tokens
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        assert seen == [int(inputs["attention_mask"].sum(1).max()) - (16 - K)]
        assert out.merged_attention_mask.sum(1).tolist() == (inputs["attention_mask"].sum(1) - (16 - K)).tolist()
    finally:
        disable_dymu(model)


def test_bad_method_settings_are_refused_in_one_line(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="method must be one of dymu, tome, prune, random, got 'topk'"):
        enable_dymu(model, method="topk", token_budget=K)
    with pytest.raises(ValueError, match="needs token_budget"):
        enable_dymu(model, method="prune")
    with pytest.raises(ValueError, match="VTU has nothing to unmerge"):
        enable_dymu(model, method="random", token_budget=K, vtu="fast")
    with pytest.raises(ValueError, match="takes no thresholds"):
        enable_dymu(model, [0.9] * 4, method="tome", token_budget=K)
    enable_dymu(model, method="prune", token_budget=40)
    try:
        with pytest.raises(ValueError, match="token_budget 40 exceeds the 16 patches"):
            with torch.no_grad():
                model(**tiny[2])
    finally:
        disable_dymu(model)
    assert vlm_state(model) is None


def test_llava_counts_come_back_with_forward_and_generate(tiny):
    model, processor, inputs = tiny
    enable_dymu(model, [0.9, 0.9, 0.9, 0.9], vtu="fast", token_order="batch")
    try:
        with torch.no_grad():
            out = model(**inputs)
            seq, tokens = generate_with_counts(model, inputs, max_new_tokens=3, do_sample=False)
            alone = [model(**processor(images=[i], text=[t], return_tensors="pt")).visual_token_counts[0]
                     for i, t in zip(IMAGES, TEXTS)]
    finally:
        disable_dymu(model)
    assert out.visual_token_counts == tokens.counts == alone  # per image, from the call itself
    assert len(set(tokens.counts)) > 1 and max(tokens.counts) < 16  # images keep different counts
    assert tokens.crop_counts is None and out.crop_token_counts is None
    assert not hasattr(model, "dymu_last_counts")
    _, stock = generate_with_counts(model, inputs, max_new_tokens=1, do_sample=False)  # the stock model
    assert stock.counts == [16, 16, 16]


def test_onevision_counts_come_back_with_forward_and_generate():
    model, processor = tiny_onevision()
    imgs = [make_image("flat", 56, 0), make_image("textured", 70, 1)]
    texts = ["w1 <image> w2", "w3 <image>"]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[[i] for i in imgs], text=texts, return_tensors="pt", padding=True)
    enable_dymu_onevision(model, [0.6, 0.6, 0.6])
    try:
        with torch.no_grad():
            out = model(**inputs)
            seq, tokens = generate_with_counts(model, inputs, max_new_tokens=2, do_sample=False)
    finally:
        from dymu.vlm import disable_dymu_onevision

        disable_dymu_onevision(model)
    assert out.visual_token_counts == tokens.counts and out.crop_token_counts == tokens.crop_counts
    assert tokens.counts[0] != tokens.counts[1]
    assert [len(c) for c in tokens.crop_counts] == [len(c) for c in out.crop_token_counts] and all(
        len(c) > 1 for c in tokens.crop_counts)
    _, stock = generate_with_counts(model, inputs, max_new_tokens=1, do_sample=False)
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert stock.counts == placeholders and all(c < p for c, p in zip(tokens.counts, placeholders))


def test_generate_command_takes_the_method(tmp_path, capsys):
    from dymu.cli import main
    from dymu.testing import save_tiny_llava

    model_dir = save_tiny_llava(tmp_path / "llava", image_size=56)
    paths = []
    for i, img in enumerate(IMAGES[:2]):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    argv = ["generate", "--model", str(model_dir), "--prompt", "w1", "--max-new-tokens", "1"]
    argv += [x for p in paths for x in ("--image", p)]
    assert main(argv + ["--method", "prune", "--token-budget", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("(5 visual tokens)") == 2 and "visual tokens per image: 5.0 ± 0.0" in out
    assert main(argv + ["--method", "random"]) == 2
    assert "--method random needs --token-budget K" in capsys.readouterr().err
