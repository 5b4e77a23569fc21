"""Issue 29, items 1-3: a threshold checkpoint records what decides its token grid (input size, patch size) and
how images were preprocessed; another grid is refused; one DINOv2 identity has one preprocessing; full token
counts and token budgets come from the pixels the processor makes, not from a DINOv2 config's 518 px."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import dymu
from dymu.cli import main
from dymu.samples import make_image
from dymu.thresholds import ThresholdCheckpoint, load_thresholds, merge_schedule, save_thresholds

LAYERS = 4


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    """A tiny random Dinov2Model folder whose stock processor resizes to 112 and centre-crops 84 (6 x 6 patches);
    its config says 518 px, as the real DINOv2's does."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from dymu.testing import scale_weights

    directory = tmp_path_factory.mktemp("identity") / "tiny-dino"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, mlp_ratio=2,
                          image_size=518, patch_size=14, architectures=["Dinov2Model"])
    scale_weights(Dinov2Model(config), 0.3, 0).save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 84, "width": 84}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                      ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    """Wide images (a crop and a squash see different pixels) and their JSON list."""
    root = tmp_path_factory.mktemp("identity-images")
    names = []
    for i, kind in enumerate(["flat", "textured", "stripes", "gradient", "textured", "flat"]):
        names.append(f"{kind}{i}.png")
        make_image(kind, 120, seed=i).resize((180, 90)).save(root / names[-1])
    (root / "images.json").write_text(json.dumps([{"image": n} for n in names]))
    return root, names


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dinov2_has_one_preprocessing_and_checkpoints_record_it(dino_dir, images, tmp_path, capsys):
    from transformers import BitImageProcessor

    from dymu.data import load_image
    from dymu.encoders.loading import load_encoder

    root, names = images
    by_folder = load_encoder(str(dino_dir))
    by_name = load_encoder("dinov2-518px-p14-d64-84-tome-16out", weights=str(dino_dir))
    # both squash the whole image to 84 x 84 (no crop), exactly as a squashing processor (the small VLM's) does
    squash = BitImageProcessor(size={"height": 84, "width": 84}, do_center_crop=False, resample=3,
                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    image = load_image(root / names[1])
    expected = squash(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(by_folder.preprocess(image), expected) and torch.equal(by_name.preprocess(image), expected)
    assert by_folder.image_size == by_name.image_size == 84

    out = tmp_path / "found.safetensors"
    code, printed, err = run(capsys, "thresholds", "--model", dino_dir, "--data", root / "images.json",
                             "--batch-size", "3", "--num-workers", "0", "--quiet", "--out-tokens", "16",
                             "--output", out)
    assert code == 0, err
    assert "inputs: 84x84 px (6x6 patches of 14 px), preprocessed as 'squash 84x84 bicubic'" in printed
    ckpt = load_thresholds(out)
    assert (ckpt.input_size, ckpt.patch_size, ckpt.grid_tokens) == ((84, 84), 14, 36)
    assert ckpt.preprocess == "squash 84x84 bicubic"


def test_another_input_size_is_refused(dino_dir, images, tmp_path, capsys):
    from transformers import Dinov2Model

    root, names = images
    model = Dinov2Model.from_pretrained(dino_dir, attn_implementation="sdpa").eval()
    counts = merge_schedule("constant", 20, LAYERS)
    ckpt = ThresholdCheckpoint([0.2] * LAYERS, encoder="dinov2-518px-p14-d64", r_total=20, merge_counts=counts,
                               input_size=(84, 84), patch_size=14, preprocess="squash 84x84 bicubic")
    recorded = save_thresholds(tmp_path / "recorded.safetensors", ckpt)
    # a file written before the grid was recorded, under a DINOv2 DyMU name that says the side
    legacy = ThresholdCheckpoint([0.2] * LAYERS, encoder="dinov2-518px-p14-d64", r_total=20, merge_counts=counts)
    named = save_thresholds(tmp_path / "dinov2-518px-p14-d64-84-tome-16out.safetensors", legacy)
    unnamed = save_thresholds(tmp_path / "renamed.safetensors", legacy)
    assert load_thresholds(named).input_size == (84, 84) and load_thresholds(unnamed).input_size is None

    x84, x112 = torch.randn(2, 3, 84, 84), torch.randn(2, 3, 112, 112)
    for path in (recorded, named):
        dymu.patch(model, path)
        with torch.no_grad():
            assert model(pixel_values=x84).last_hidden_state.shape[1] < 37  # merges at its own size
            with pytest.raises(ValueError, match=r"found on 84x84 px .*36 patch tokens.* has 64 patch tokens"):
                model(pixel_values=x112)
        dymu.unpatch(model)
    dymu.patch(model, unnamed)  # unknown grid: only the identity and layer count are checked, as before
    with torch.no_grad():
        model(pixel_values=x112)
    dymu.unpatch(model)

    # the CLI refuses before loading the model when the DyMU name's side differs from the checkpoint's
    code, _, err = run(capsys, "encode", "--model", "dinov2-518px-p14-d64-112-tome-16out", "--weights", dino_dir,
                       "--thresholds", recorded, root / names[0])
    assert code == 2 and "were found on 84x84 px (6x6 patches of 14 px) inputs, but this encoder gets 112x112" in err
    code, _, err = run(capsys, "encode", "--model", "dinov2-518px-p14-d64-112-tome-16out", "--weights", dino_dir,
                       "--thresholds", named, root / names[0])
    assert code == 2 and "were found on 84x84 px" in err
    code, out, err = run(capsys, "encode", "--model", dino_dir, "--thresholds", recorded, root / names[0], "--json")
    assert code == 0, err
    # same grid, another recorded preprocessing: used, with a warning
    ckpt.preprocess = "resize 112, crop 84x84 bicubic"
    cropped = save_thresholds(tmp_path / "cropped.safetensors", ckpt)
    with pytest.warns(UserWarning, match="preprocessed as 'resize 112, crop 84x84 bicubic', these are 'squash 84x84"):
        code, out, err = run(capsys, "encode", "--model", dino_dir, "--thresholds", cropped, root / names[0])
    assert code == 0, err


def test_full_counts_and_budgets_come_from_the_pixels(dino_dir, images, capsys):
    from transformers import BitImageProcessor, Dinov2Config, LlavaConfig, LlavaForConditionalGeneration

    from dymu.testing import tiny_llama_config
    from dymu.vlm.llava import full_image_tokens

    root, names = images
    # encode --token-budget: above the 36 patch tokens of an 84 px input is refused (the config's 518 px would
    # allow 1369), a reachable one is met
    code, _, err = run(capsys, "encode", "--model", dino_dir, "--thresholds", _found(dino_dir, root, capsys),
                       "--token-budget", "100", *(root / n for n in names[:3]))
    assert code == 2 and "budget of 100 is out of range" in err and "36 patch tokens of a 84x84 px image" in err
    code, out, err = run(capsys, "encode", "--model", dino_dir, "--thresholds", _found(dino_dir, root, capsys),
                         "--token-budget", "20", *(root / n for n in names[:3]))
    assert code == 0, err
    mean = float(re.search(r"([\d.]+) tokens per image on average", out)[1])
    assert abs(mean - 20) <= 0.5 or "cannot be reached" in out

    # a LLaVA with a DINOv2 tower: the stock count is the processor's grid, not the config's 518 px
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=518,
                          patch_size=14)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=tiny_llama_config(),
                                                      image_token_id=5, vision_feature_layer=-1))
    processor = type("P", (), {"image_processor": BitImageProcessor(size={"height": 84, "width": 84},
                                                                   do_center_crop=False)})()
    assert full_image_tokens(model, processor=processor) == 36
    assert full_image_tokens(model, torch.zeros(1, 3, 112, 112)) == 64
    with pytest.raises(ValueError, match="depends on its input size"):
        full_image_tokens(model)


def _found(dino_dir: Path, root: Path, capsys) -> Path:
    out = root / "budget.safetensors"
    if not out.exists():
        code, _, err = run(capsys, "thresholds", "--model", dino_dir, "--data", root / "images.json",
                           "--batch-size", "3", "--num-workers", "0", "--quiet", "--out-tokens", "16", "--output", out)
        assert code == 0, err
    return out


@pytest.fixture(scope="module")
def dino_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA whose tower is a DINOv2 (config 518 px) and whose processor squashes to 56 px (16 patches)."""
    from transformers import BitImageProcessor, Dinov2Config, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from dymu.testing import CHAT_TEMPLATE, scale_weights, tiny_llama_config, word_tokenizer

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=518,
                          patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(vocab_size=len(tokenizer)),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=16)
    model = scale_weights(LlavaForConditionalGeneration(config).eval(), 0.3, 0)
    squash = BitImageProcessor(size={"height": 56, "width": 56}, do_center_crop=False, resample=3)
    processor = LlavaProcessor(image_processor=squash, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    directory = tmp_path_factory.mktemp("dino-llava") / "model"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_vlm_counts_and_checkpoints_follow_its_processor(dino_llava, images, tmp_path, capsys):
    from dymu.vlm import load_llava

    root, names = images
    code, out, err = run(capsys, "generate", "--model", dino_llava, "--no-dymu", "--image", root / names[0],
                         "--prompt", "what", "--max-new-tokens", "1")
    assert code == 0, err
    assert "(16 visual tokens)" in out  # the processor's 56 px grid, not the config's 518 px (1369)

    counts = merge_schedule("constant", 8, 2)
    wrong = save_thresholds(tmp_path / "at84.safetensors", ThresholdCheckpoint(
        [0.2, 0.2], encoder="dinov2-518px-p14-d32", merge_counts=counts, input_size=(84, 84), patch_size=14))
    with pytest.raises(ValueError, match=r"found on 84x84 px .* gets 56x56 px"):
        load_llava(dino_llava, thresholds=wrong)
    cropped = save_thresholds(tmp_path / "at56.safetensors", ThresholdCheckpoint(
        [0.2, 0.2], encoder="dinov2-518px-p14-d32", merge_counts=counts, input_size=(56, 56), patch_size=14,
        preprocess="resize 64, crop 56x56 bicubic"))
    with pytest.warns(UserWarning, match="preprocessed as 'resize 64, crop 56x56 bicubic'.* 'squash 56x56 bicubic'"):
        load_llava(dino_llava, thresholds=cropped)
