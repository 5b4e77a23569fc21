"""DToMe, VTU and a tiny LLaVA on an accelerator, in fp32 and half precision (bf16/fp16), against CPU fp32.

Marked ``gpu``: ``bench/gpu.sh`` runs them (``python -m pytest -m gpu``) on a machine with CUDA; without CUDA they
skip. ``DYMU_TEST_DEVICE`` picks the device (default ``cuda``); ``DYMU_TEST_DEVICE=cpu`` runs the same checks on
the CPU (half precision included), which is how they are kept working on machines without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from dymu.merge import TokenState, dtome_step
from dymu.samples import make_image
from dymu.testing import find_and_save_thresholds, scale_weights, tiny_llama_config, tiny_llava

DEVICE = torch.device(os.environ.get("DYMU_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device (DYMU_TEST_DEVICE=cpu runs these checks on the CPU)"),
]
HALF = [torch.bfloat16, torch.float16]
IMAGES = [make_image("flat", 64, 0), make_image("textured", 64, 1), make_image("stripes", 64, 2)]
TEXTS = ["USER: <image> w1 w2 ASSISTANT:", "USER: <image> w3 ASSISTANT:", "USER: w5 <image> w6 w7 w8 ASSISTANT:"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest deviation relative to the reference's largest magnitude."""
    return float((got.float().cpu() - want.float().cpu()).abs().max() / want.abs().max())


# ---------------------------------------------------------------------------------------------------- DToMe
def merge_run(x: torch.Tensor, proj: torch.Tensor, thresholds: list[float], order: str) -> TokenState:
    state = TokenState.init(x)
    for t in thresholds:
        state, _ = dtome_step(state, state.x @ proj.to(x.dtype), mode="infer", protect_first=True, threshold=t,
                              order=order)
    return state


@pytest.mark.parametrize("order", ["authors", "single"])
def test_dtome_on_the_device_equals_cpu(order):
    """fp32 on the device merges exactly the CPU's groups with the same features; half precision keeps the dtype,
    covers every patch once and stays within its rounding of the fp32 features where the groups agree."""
    g = torch.Generator().manual_seed(0)
    x, proj = torch.randn(3, 50, 16, generator=g), torch.randn(16, 8, generator=g)
    thresholds = [0.6, 0.5, 0.7, 0.4]
    cpu = merge_run(x, proj, thresholds, order)
    dev = merge_run(x.to(DEVICE), proj.to(DEVICE), thresholds, order)
    assert torch.equal(dev.source_map.cpu(), cpu.source_map)
    torch.testing.assert_close(dev.x.cpu(), cpu.x, rtol=1e-5, atol=1e-5)
    assert int(cpu.num_tokens.sum()) < 3 * 50  # something merged
    for dtype in HALF:
        half = merge_run(x.to(DEVICE, dtype), proj.to(DEVICE), thresholds, order)
        assert half.x.dtype == dtype
        assert torch.equal(half.sizes.sum(1).cpu(), torch.full((3,), 50.0))
        for b in range(3):
            if torch.equal(half.source_map[b].cpu(), cpu.source_map[b]):
                n = int(cpu.num_tokens[b])
                assert rel_err(half.x[b, :n], cpu.x[b, :n]) < 2e-2, (dtype, b)


# ---------------------------------------------------------------------------------------------------- VTU
def vtu_logits(model, groups, embeds, mode: str, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    from dymu.vtu import enable_vtu, prepare_vtu, vtu_forward

    enable_vtu(model, mode)
    batch = prepare_vtu(groups).to(device)
    with torch.no_grad():
        out = vtu_forward(model, batch, inputs_embeds=batch.pad([e.to(device, dtype) for e in embeds]))
    return [t.float().cpu() for t in batch.unpad(out.logits)]


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = scale_weights(LlamaForCausalLM(tiny_llama_config(vocab_size=97, layers=2)).eval())
    g = torch.Generator().manual_seed(1)
    from dymu.vtu import concat_groups

    groups = []
    for n, k in ((30, 7), (18, 5)):  # text, an image of n patches merged to k tokens (each used), text
        local = torch.randint(0, k, (n,), generator=g)
        local[torch.randperm(n, generator=g)[:k]] = torch.arange(k)
        groups.append(concat_groups([3, local, 4]))
    embeds = [torch.randn(int(grp.max()) + 1, 64, generator=g) for grp in groups]
    return model, groups, embeds


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_vtu_fast_and_exact_on_the_device_equal_cpu(llama, dtype):
    """Batched VTU (fast and exact) on the device against the CPU fp32 fast path (itself checked against the
    definition in test_vtu.py): fp32 to 1e-4, half precision to its rounding; fast and exact agree."""
    model, groups, embeds = llama
    from dymu.vtu import disable_vtu

    try:
        ref = vtu_logits(model, groups, embeds, "fast", torch.device("cpu"), torch.float32)
        model.to(DEVICE, dtype)
        got = {mode: vtu_logits(model, groups, embeds, mode, DEVICE, dtype) for mode in ("fast", "exact")}
    finally:
        disable_vtu(model)
        model.to("cpu", torch.float32)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert max(float(r.abs().max()) for r in ref) > 1.0  # logits are not trivially small
    for mode, logits in got.items():
        for g, r in zip(logits, ref):
            assert torch.isfinite(g).all() and rel_err(g, r) < tol, (mode, dtype, rel_err(g, r))
    for f, e in zip(got["fast"], got["exact"]):
        assert rel_err(f, e) < tol


# ---------------------------------------------------------------------------------------------------- LLaVA
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model, processor = tiny_llava(image_size=56)
    calib = [make_image(k, 64, s) for s in range(3, 6) for k in ("flat", "gradient", "stripes", "textured")]
    pixels = processor.image_processor(calib, return_tensors="pt").pixel_values
    thresholds = find_and_save_thresholds(model.model.vision_tower, pixels, 8,
                                          tmp_path_factory.mktemp("thr") / "tiny-tome.safetensors")
    return model, processor, thresholds


def generate(model, processor, device, dtype):
    inputs = processor(images=IMAGES, text=TEXTS, return_tensors="pt", padding=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    from dymu.vlm import generate_with_counts

    with torch.no_grad():
        out, tokens = generate_with_counts(model, inputs, max_new_tokens=6, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].cpu(), tokens.counts


@pytest.mark.parametrize("vtu", ["fast", "exact"])
def test_llava_generate_on_the_device(llava, vtu):
    """DyMU + VTU generation on the device: fp32 gives the CPU's tokens and visual counts; bf16 and fp16 run, keep
    about the same counts (scores of half-precision keys move an edge near its threshold) and give valid ids."""
    from dymu.vlm import disable_dymu, enable_dymu

    model, processor, thresholds = llava
    model.generation_config.eos_token_id = None  # fixed-length runs, comparable token by token
    enable_dymu(model, thresholds, vtu=vtu)
    try:
        want, counts = generate(model, processor, torch.device("cpu"), torch.float32)
        assert counts and all(0 < c <= 16 for c in counts) and sum(counts) < 48  # 56 px / 14: 16 patches each
        model.to(DEVICE)
        got, dev_counts = generate(model, processor, DEVICE, torch.float32)
        assert dev_counts == counts and torch.equal(got, want)
        for dtype in HALF:
            model.to(DEVICE, dtype)
            tokens, half_counts = generate(model, processor, DEVICE, dtype)
            assert tokens.shape == want.shape and int(tokens.max()) < model.config.text_config.vocab_size
            assert sum(half_counts) == pytest.approx(sum(counts), abs=2), (dtype, half_counts, counts)
    finally:
        disable_dymu(model)
        model.to("cpu", torch.float32)
