"""DyMU LLaVA's ``forward`` carries the stock signature, so ``generate`` treats it as the stock model: it passes
``logits_to_keep=1`` at prefill and, without VTU, builds ``position_ids`` from the attention mask."""

from __future__ import annotations

import inspect

import pytest
import torch

from dymu.samples import make_image
from dymu.testing import tiny_llava
from dymu.vlm import disable_dymu, enable_dymu

IMAGES = [make_image("flat", 64, 0), make_image("textured", 64, 1), make_image("stripes", 64, 2)]
TEXTS = ["USER: <image> w1 w2 ASSISTANT:", "USER: <image> w3 ASSISTANT:", "USER: w5 <image> w6 w7 w8 ASSISTANT:"]
THRESHOLDS = [0.3, 0.3, 0.3, 0.3]  # one per tower block: merges, and differently per image


@pytest.fixture(scope="module")
def model_and_inputs():
    model, processor = tiny_llava(image_size=56)
    model.generation_config.eos_token_id = None  # fixed-length greedy runs
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=IMAGES, text=TEXTS, return_tensors="pt", padding=True)
    assert not bool(inputs["attention_mask"].all())  # a padded batch
    return model, inputs


def test_forward_has_the_stock_signature(model_and_inputs):
    model, _ = model_and_inputs
    stock = inspect.signature(model.forward)
    enable_dymu(model, THRESHOLDS, vtu="fast")
    try:
        assert inspect.signature(model.forward) == stock
        assert model._supports_logits_to_keep() and model._supports_mm_encoder_outputs()
    finally:
        disable_dymu(model)


@pytest.mark.parametrize("vtu", ["fast", "exact", "off"])
def test_generate_keeps_last_logits_and_matches_forward(model_and_inputs, vtu):
    """Prefill computes the last position's logits only, and generate's first logits equal forward's last ones (with
    ``vtu="off"``: forward at the positions the attention mask gives, as generate builds them)."""
    model, inputs = model_and_inputs
    calls, head_rows = [], []
    enable_dymu(model, THRESHOLDS, vtu=vtu)
    pre = model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    head = model.lm_head.register_forward_hook(lambda m, a, out: head_rows.append(out.shape[1]))
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        pre.remove()
        head.remove()
        assert len(calls) == 3 and calls[0].get("logits_to_keep") == 1, [c.get("logits_to_keep") for c in calls]
        assert head_rows == [1, 1, 1]  # the prefill's LM head ran on the last position only
        assert sum(out.visual_token_counts) < 3 * 16  # merged, reported with generate's output
        extra = {}
        if vtu == "off":  # generate built positions from the merged layout's attention mask
            assert calls[0]["position_ids"] is not None
            merged_mask = calls[0]["attention_mask"]
            extra["position_ids"] = (merged_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            want = model(**inputs, **extra).logits[:, -1]
        torch.testing.assert_close(out.logits[0], want, atol=1e-5, rtol=1e-5)
    finally:
        pre.remove()
        head.remove()
        disable_dymu(model)
