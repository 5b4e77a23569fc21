"""LLaVA-1.5 with DyMU on transformers' LlavaForConditionalGeneration: equivalence, VTU, loading, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

import dymu
from dymu.vtu import cache_kwarg, output_cache
from dymu.samples import make_image
from dymu.testing import find_and_save_thresholds
from dymu.testing import save_tiny_llava
from dymu.thresholds import ThresholdCheckpoint, save_thresholds
from dymu.vlm import answer, disable_dymu, dymu_vtu_mode, enable_dymu, load_llava
from dymu.vlm.base import collapse_placeholders

IMAGES = [make_image("flat", 64, 0), make_image("textured", 64, 1), make_image("stripes", 64, 2)]
TEXTS = ["USER: <image> w1 w2 ASSISTANT:", "USER: <image> w3 ASSISTANT:", "USER: w5 <image> w6 w7 w8 ASSISTANT:"]
GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"), image_size=56)


@pytest.fixture(scope="module")
def thresholds_file(llava_dir, tmp_path_factory):
    """Thresholds found on the tiny tower over generated images (8 merges over 4 blocks). Not on IMAGES: on the
    finding batch one edge per layer sits exactly on its threshold, and rounding would decide it."""
    model, processor = load_llava(llava_dir, dymu=False)
    calib = [make_image(k, 64, s) for s in range(3, 6) for k in ("flat", "gradient", "stripes", "textured")]
    pixels = processor.image_processor(calib, return_tensors="pt").pixel_values
    return find_and_save_thresholds(model.model.vision_tower, pixels, 8, tmp_path_factory.mktemp("thr") / "tiny-tome.safetensors")


@pytest.fixture()
def model_and_inputs(llava_dir):
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    _, processor = load_llava(llava_dir, dymu=False)
    inputs = processor(images=IMAGES, text=TEXTS, return_tensors="pt", padding=True)
    return model, processor, inputs


def visual_counts(model, inputs):
    """The per-image visual token counts a forward call reports with its output."""
    with torch.no_grad():
        return model(**inputs).visual_token_counts


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def test_merging_off_equals_stock(model_and_inputs):
    model, _, inputs = model_and_inputs
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, **GEN)
    for vtu in ("fast", "exact", "off"):
        enable_dymu(model, None, vtu=vtu)
        with torch.no_grad():
            out = model(**inputs)
            gen = model.generate(**inputs, **GEN)
        mask = inputs["attention_mask"].bool()
        scale = ref.abs().max()
        assert float((out.logits - ref)[mask].abs().max()) <= 1e-5 * scale, vtu
        assert torch.equal(gen, ref_gen), vtu
        assert out.visual_token_counts == [16, 16, 16]
        disable_dymu(model)
    assert type(model) is LlavaForConditionalGeneration
    torch.testing.assert_close(model(**inputs).logits, ref)


def test_merging_on_fast_equals_exact_and_reports_counts(model_and_inputs, thresholds_file, caplog):
    model, _, inputs = model_and_inputs
    ref = last_logits(model, inputs)
    seen_lengths = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen_lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    results = {}
    for vtu in ("fast", "exact", "off"):
        enable_dymu(model, thresholds_file, vtu=vtu)
        with caplog.at_level("INFO", logger="dymu.vlm.llava"):
            logits = last_logits(model, inputs)
            gen = model.generate(**inputs, **GEN, return_dict_in_generate=True)
        results[vtu] = (logits, gen.sequences, list(gen.visual_token_counts))
        disable_dymu(model)
    hook.remove()
    counts = results["fast"][2]
    assert sum(counts) < 3 * 16 and len(set(counts)) > 1, counts  # merged, per image
    assert counts[0] < counts[1]  # the flat image keeps fewer tokens than the textured one
    assert "visual tokens per image" in caplog.text
    assert max(seen_lengths) < inputs["input_ids"].shape[1]  # fewer tokens reach the language model
    fast, exact, plain = results["fast"], results["exact"], results["off"]
    scale = float(ref.abs().max())
    assert float((fast[0] - exact[0]).abs().max()) <= 1e-4 * scale
    assert torch.equal(fast[1], exact[1])
    # generate returns the caller's prompt followed by the new tokens, like the stock model
    assert torch.equal(fast[1][:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    # VTU is not a no-op: plain merged tokens at consecutive positions give other logits
    assert float((fast[0] - plain[0]).abs().max()) > 1e-2 * scale


def test_batch_equals_one_by_one(model_and_inputs, thresholds_file):
    model, processor, inputs = model_and_inputs
    # the batch path for every batch: with the default "authors" order a lone image takes the authors'
    # single-image path and may keep other counts than inside a batch (tests/test_token_order.py)
    enable_dymu(model, thresholds_file, vtu="fast", token_order="batch")
    batch_logits = last_logits(model, inputs)
    batch_counts = visual_counts(model, inputs)
    with torch.no_grad():
        batch_gen = model.generate(**inputs, **GEN)[:, -GEN["max_new_tokens"] :]
    for i in range(3):
        one = processor(images=[IMAGES[i]], text=[TEXTS[i]], return_tensors="pt")
        logits = last_logits(model, one)
        assert visual_counts(model, one) == [batch_counts[i]]
        torch.testing.assert_close(logits[0], batch_logits[i], atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            gen = model.generate(**one, **GEN)[:, -GEN["max_new_tokens"] :]
        assert torch.equal(gen[0], batch_gen[i])


def test_dymu_block_in_config_json(llava_dir, thresholds_file, tmp_path):
    import shutil

    target = tmp_path / "with-dymu"
    shutil.copytree(llava_dir, target)
    shutil.copy(thresholds_file, target / "thresholds.safetensors")
    config = json.loads((target / "config.json").read_text())
    config["dymu"] = {"thresholds": "thresholds.safetensors", "vtu": "exact"}
    (target / "config.json").write_text(json.dumps(config))
    model, processor = load_llava(target)
    assert dymu.get_state(model.model.vision_tower).mode == "infer"
    results = answer(model, processor, IMAGES[:2], ["w1 w2", "w3"], max_new_tokens=4)
    inputs = processor(images=IMAGES[:2], text=[TEXTS[0], TEXTS[1]], return_tensors="pt", padding=True)
    assert [r.visual_tokens for r in results] == visual_counts(model, inputs)
    assert all(isinstance(r.text, str) and r.text for r in results)
    plain, _ = load_llava(target, dymu=False)
    assert dymu_vtu_mode(plain) is None and dymu_vtu_mode(model) == "exact"
    config["dymu"] = {"thresholds": "thresholds.safetensors", "vtu": "sideways"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dymu.vtu must be"):
        load_llava(target)


# ---------------------------------------------------------------- original LLaVA checkpoints
def write_original_checkpoint(hf_model, processor, directory, tower_dir, mm_vision_tower):
    """Write ``hf_model`` in the original LlavaLlamaForCausalLM layout (as liuhaotian/llava-v1.5-* ship it)."""
    directory.mkdir(parents=True)
    text = hf_model.config.text_config
    state = {}
    for key, value in hf_model.state_dict().items():
        if key.startswith("model.vision_tower."):
            continue  # the original checkpoints do not hold the tower
        key = key.replace("model.language_model.", "model.")
        key = key.replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
        key = key.replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")
        state[key] = value.contiguous().clone()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "max_position_embeddings": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
        "mm_vision_tower": mm_vision_tower,
        "mm_hidden_size": hf_model.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def original_checkpoint(llava_dir, tmp_path_factory):
    hf_model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    _, processor = load_llava(llava_dir, dymu=False)
    root = tmp_path_factory.mktemp("original")
    tower_dir = root / "clip-tower"
    hf_model.model.vision_tower.save_pretrained(tower_dir)
    processor.image_processor.save_pretrained(tower_dir)
    ckpt = write_original_checkpoint(hf_model, processor, root / "llava-v1.5-tiny", tower_dir, str(tower_dir))
    return hf_model, ckpt, tower_dir


def test_original_checkpoint_loads_and_matches(original_checkpoint):
    hf_model, ckpt, _ = original_checkpoint
    model, processor = load_llava(ckpt)
    assert dymu_vtu_mode(model) is None  # a plain tower name: DyMU stays off
    assert processor.image_processor.do_pad  # image_aspect_ratio 'pad'
    inputs = processor(images=IMAGES[:2], text=TEXTS[:2], return_tensors="pt", padding=True)
    torch.testing.assert_close(last_logits(model, inputs), last_logits(hf_model, inputs), atol=1e-5, rtol=1e-5)


def test_original_checkpoint_dymu_tower_name_switches_dymu_on(original_checkpoint, thresholds_file, monkeypatch, tmp_path):
    import shutil

    hf_model, ckpt, tower_dir = original_checkpoint
    edited = tmp_path / "llava-dymu"
    shutil.copytree(ckpt, edited)
    config = json.loads((edited / "config.json").read_text())
    config["mm_vision_tower"] = "ViT-L-14-336-tome-72out"  # the user's habit from the authors' README
    (edited / "config.json").write_text(json.dumps(config))
    # the DyMU name's default threshold checkpoint, relative to the working directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="ViT-L-14-336-tome-72out"):
        load_llava(edited, vision_tower=tower_dir)
    target = tmp_path / "checkpoints" / "threshold_checkpoints" / "ViT-L-14-336-tome-72out.safetensors"
    target.parent.mkdir(parents=True)
    shutil.copy(thresholds_file, target)
    model, processor = load_llava(edited, vision_tower=tower_dir)
    assert dymu.get_state(model.model.vision_tower).mode == "infer"
    inputs = processor(images=IMAGES, text=TEXTS, return_tensors="pt", padding=True)
    assert sum(visual_counts(model, inputs)) < 3 * 16


# ---------------------------------------------------------------- bad input
def test_bad_input(model_and_inputs, thresholds_file, tmp_path):
    model, processor, inputs = model_and_inputs
    other = ThresholdCheckpoint(torch.zeros(4), encoder="siglip-so400m-patch14-384")
    path = save_thresholds(tmp_path / "other.safetensors", other)
    with pytest.raises(ValueError, match="are for encoder 'siglip-so400m-patch14-384'"):
        enable_dymu(model, path)
    assert type(model) is LlavaForConditionalGeneration  # a failed enable leaves the model stock
    enable_dymu(model, thresholds_file)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    with pytest.raises(ValueError, match="pixel_values with a non-empty cache"):  # under either cache keyword
        model(**inputs, **{cache_kwarg(model): cache})
    no_image = processor.tokenizer(["USER: w1 w2 ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="no prompt holds the image token"):
        model(**no_image, pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="3 images were given but the prompts hold placeholders for 2"):
        two = processor(images=IMAGES[:2], text=TEXTS[:2], return_tensors="pt", padding=True)
        model(input_ids=two["input_ids"], attention_mask=two["attention_mask"], pixel_values=inputs["pixel_values"])
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image"):
        answer(model, processor, [corrupt], ["w1"])
    with pytest.raises(FileNotFoundError, match="image not found"):
        answer(model, processor, [tmp_path / "missing.jpg"], ["w1"])
    with pytest.raises(ValueError, match="already enabled"):
        enable_dymu(model, thresholds_file)
    disable_dymu(model)
    with pytest.raises(ValueError, match="vtu must be"):
        enable_dymu(model, thresholds_file, vtu="slow")


def test_collapse_placeholders_layout():
    ids = torch.tensor([[3, 3, 5, 4, 4, 4, 4, 8], [5, 4, 4, 4, 4, 9, 4, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    maps = [torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 0])]
    # row 1 holds one expanded image (4 placeholders) and one unexpanded <image>
    rows, groups, _ = collapse_placeholders(ids, mask, 4, maps)  # each map: the image's 4 stock positions
    assert rows[0].tolist() == [5, 4, 4, 8]
    assert groups[0].tolist() == [0, 1, 1, 2, 1, 3]
    assert rows[1].tolist() == [5, 4, 4, 4, 4, 9, 4, 4, 6]
    assert groups[1].tolist() == [0, 1, 2, 3, 4, 5, 7, 7, 6, 6, 8]
    with pytest.raises(ValueError, match="run of 3 image tokens"):
        collapse_placeholders(torch.tensor([[5, 4, 4, 4, 8]]), None, 4, maps[:1])


def test_token_budget_and_generate_cli(llava_dir, thresholds_file, tmp_path, capsys):
    from dymu.cli import main
    from dymu.vlm.llava import calibrate_token_budget

    model, processor = load_llava(llava_dir, thresholds=thresholds_file)
    paths = []
    for i, img in enumerate(IMAGES):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    for target in (4.0, 10.0):
        offset = calibrate_token_budget(model, processor, paths, target)
        counts = [r.visual_tokens for r in answer(model, processor, paths, ["w1"] * 3, max_new_tokens=1)]
        mean = sum(counts) / 3
        assert abs(mean - target) <= 1.5, (target, offset, counts)
    with pytest.raises(ValueError, match=r"target_tokens must be in \(0, 16\]"):
        calibrate_token_budget(model, processor, paths, 40)

    argv = ["generate", "--model", str(llava_dir), "--thresholds", str(thresholds_file), "--prompt", "w1 w2"]
    argv += [x for p in paths for x in ("--image", str(p))] + ["--max-new-tokens", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("visual tokens)") == 3 and "visual tokens per image:" in out
    assert main(argv + ["--token-budget", "6"]) == 0
    assert "threshold offset for 6 visual tokens" in capsys.readouterr().out
    assert main(["generate", "--model", str(llava_dir), "--image", str(tmp_path / "nope.png"), "--prompt", "w1"]) == 2
    assert "image not found" in capsys.readouterr().err


def test_convert_llava_command(original_checkpoint, thresholds_file, tmp_path, capsys):
    from dymu.cli import main

    hf_model, ckpt, tower_dir = original_checkpoint
    out = tmp_path / "converted"
    argv = ["convert-llava", str(ckpt), str(out), "--vision-tower", str(tower_dir)]
    assert main(argv + ["--thresholds", str(thresholds_file), "--vtu", "exact"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dymu"]["vtu"] == "exact" and (out / config["dymu"]["thresholds"]).is_file()
    model, processor = load_llava(out)
    assert dymu.get_state(model.model.vision_tower).mode == "infer"
    disable_dymu(model)
    inputs = processor(images=IMAGES[:1], text=TEXTS[:1], return_tensors="pt")
    torch.testing.assert_close(last_logits(model, inputs), last_logits(hf_model, inputs), atol=1e-5, rtol=1e-5)


def test_merged_llava_equals_vtu_definition(model_and_inputs, thresholds_file):
    """End to end against the plain reference of tests/test_vtu.py: expand each merged token to the positions its
    source map lists, run every layer on the full sequence, average each group (the definition of VTU)."""
    from types import SimpleNamespace

    from test_vtu import reference_logits

    from dymu.vlm.llava import prepare_inputs

    model, processor, _ = model_and_inputs
    enable_dymu(model, thresholds_file, vtu="fast")
    lm = model.model.language_model
    for i in (0, 2):
        one = processor(images=[IMAGES[i]], text=[TEXTS[i]], return_tensors="pt")
        seen = []
        hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"][0]), with_kwargs=True)
        got = last_logits(model, one)[0]
        hook.remove()
        groups = prepare_inputs(model, one["input_ids"], one["attention_mask"], one["pixel_values"]).groups[0]
        assert groups.numel() == one["input_ids"].shape[1] and int(groups.max()) + 1 == seen[0].shape[0] < groups.numel()
        ref = reference_logits(SimpleNamespace(model=lm, lm_head=model.lm_head), seen[0], groups)[-1]
        tolerance = 1e-4 * float(ref.abs().max())
        torch.testing.assert_close(got, ref, atol=tolerance, rtol=0)
        # a wrong grouping (the image's merged tokens in reverse order) is caught by the same comparison
        img = groups[(groups > 0) & (one["input_ids"][0] == model.config.image_token_id)]
        wrong = groups.clone()
        wrong[one["input_ids"][0] == model.config.image_token_id] = img.max() + img.min() - img
        bad = reference_logits(SimpleNamespace(model=lm, lm_head=model.lm_head), seen[0], wrong)[-1]
        assert float((bad - got).abs().max()) > 20 * tolerance
    disable_dymu(model)


def llava_decode_errors(model, inputs, steps, monkeypatch):
    """``max |logits − definition|`` per row and step ``[B, S]`` of DyMU LLaVA's own ``generate`` (step 0 = prefill),
    and the :class:`PreparedInputs` it ran on. The reference (tests/test_vtu.py) runs each row alone on the merged
    prompt the language model received, expanded by the row's groups, teacher-forced on the generated tokens."""
    from types import SimpleNamespace

    from test_vtu import reference_step_logits

    import dymu.vlm.base as llava_lib  # the one prepare_inputs of every family

    preps, seen = [], []
    prepare = llava_lib.prepare_inputs

    def recording(*args, **kwargs):
        preps.append(prepare(*args, **kwargs))
        return preps[-1]

    monkeypatch.setattr(llava_lib, "prepare_inputs", recording)
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        hook.remove()
        monkeypatch.setattr(llava_lib, "prepare_inputs", prepare)
    assert len(preps) == 1 and len(out.logits) == steps
    prep, logits, tokens = preps[0], torch.stack(out.logits, 1), out.sequences[:, -steps:]
    ref_model = SimpleNamespace(model=lm, lm_head=model.lm_head)
    refs = [
        reference_step_logits(ref_model, seen[0][b][prep.attention_mask[b].bool()], groups, tokens[b])
        for b, groups in enumerate(prep.groups)
    ]
    return (logits - torch.stack(refs)).abs().amax(-1), prep


@pytest.mark.parametrize("vtu", ["fast", "exact"])
def test_generate_logits_equal_vtu_definition_every_step(model_and_inputs, thresholds_file, vtu, monkeypatch):
    """Every step's logits of DyMU LLaVA's generate (placeholders collapsed, VTU on the merged prompt, merged-length
    cache) equal the definition at 1e-4: one prompt alone, and the padded batch of three."""
    model, processor, inputs = model_and_inputs
    single = processor(images=[IMAGES[2]], text=[TEXTS[2]], return_tensors="pt")
    enable_dymu(model, thresholds_file, vtu=vtu)
    # the DyMU class's forward(**kwargs) is looked through to the stock one for the cache keyword
    assert cache_kwarg(model) == cache_kwarg(model.model.language_model)
    try:
        for name, case in (("single", single), ("batch", inputs)):
            err, prep = llava_decode_errors(model, case, GEN["max_new_tokens"], monkeypatch)
            assert float(err.max()) <= 1e-4, (vtu, name, err.tolist())
            virtual = [g.numel() for g in prep.groups]
            merged = prep.attention_mask.sum(1).tolist()
            if name == "single":
                assert merged[0] < virtual[0]  # the image was merged
            else:  # rows of different virtual and merged lengths: padded in both layouts
                assert len(set(virtual)) > 1 and len(set(merged)) > 1, (virtual, merged)
    finally:
        disable_dymu(model)


@pytest.mark.parametrize("variant", ["vtu-off", "attends-padded-columns", "positions-from-merged-count"])
def test_generate_logits_comparison_catches_wrong_decode(model_and_inputs, thresholds_file, variant, monkeypatch):
    """The same comparison fails for plain merged tokens (no VTU) and for deliberately wrong VTU decode steps."""
    from test_vtu import _decode_attends_padded_columns, _decode_positions_from_merged_count

    model, _, inputs = model_and_inputs
    hook = None
    if variant == "attends-padded-columns":
        _decode_attends_padded_columns(monkeypatch)
    elif variant == "positions-from-merged-count":
        hook = _decode_positions_from_merged_count(monkeypatch, model.model.language_model)
    try:
        if variant != "vtu-off":  # the step-by-step test itself fails
            with pytest.raises(AssertionError, match="fast"):
                test_generate_logits_equal_vtu_definition_every_step(model_and_inputs, thresholds_file, "fast", monkeypatch)
        enable_dymu(model, thresholds_file, vtu="off" if variant == "vtu-off" else "fast")
        err, prep = llava_decode_errors(model, inputs, GEN["max_new_tokens"], monkeypatch)
    finally:
        if hook is not None:
            hook.remove()
        disable_dymu(model)
    if variant == "vtu-off":
        assert float(err.max()) > 0.1
        return
    assert float(err[:, 0].max()) <= 1e-4  # prefill is untouched
    # the rows the bug concerns: padded in the virtual layout / virtual length != merged length
    virtual = torch.tensor([g.numel() for g in prep.groups])
    rows = virtual < virtual.max() if variant == "attends-padded-columns" else virtual != prep.attention_mask.sum(1)
    assert bool(rows.any())
    assert float(err[rows, 1:].amax(0).min()) > 0.1, err.tolist()  # every decode step is far off


def test_full_image_tokens_follow_the_pixel_grid(llava_dir):
    """A tower whose config size is not its input size (DINOv2: 518 in the config, 224 px in use) gets the
    placeholder count of the pixels it is given."""
    from dymu.vlm.llava import full_image_tokens

    model, _ = load_llava(llava_dir, dymu=False)
    assert full_image_tokens(model) == (56 // 14) ** 2
    assert full_image_tokens(model, torch.zeros(1, 3, 84, 112)) == 6 * 8
