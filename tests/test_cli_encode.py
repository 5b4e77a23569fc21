"""`dymu encode`: token counts per image, per layer, offsets, budgets and clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import dymu
from dymu.cli import main
from dymu.encoders.loading import load_encoder
from dymu.samples import make_image
from dymu.thresholds import ThresholdCheckpoint, merge_schedule, save_thresholds

pytest.importorskip("skimage")

import encoder_zoo  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny CLIP folder, thresholds found on a few images, and image files."""
    root = tmp_path_factory.mktemp("encode")
    model_dir = encoder_zoo.save_hf_clip(root / "tiny-clip")
    pics = encoder_zoo.images()
    paths = []
    for name, img in pics.items():
        paths.append(root / f"{name}.png")
        img.save(paths[-1])
    loaded = load_encoder(str(model_dir))
    x = torch.stack([loaded.preprocess(p) for p in pics.values()])
    counts = merge_schedule("constant", 20, 4)
    dymu.patch(loaded.model, merge_counts=counts)
    # found on other images: on the finding batch one edge per layer sits exactly on its threshold
    finding = torch.stack([loaded.preprocess(p) for p in encoder_zoo.finding_images().values()])
    with torch.no_grad():
        loaded.model(pixel_values=finding)
    thresholds = dymu.last_run(loaded.model).found_thresholds
    dymu.unpatch(loaded.model)
    ckpt = save_thresholds(
        root / "clip-84px-p14-d64-tome-16out.safetensors",
        ThresholdCheckpoint(thresholds, encoder="clip-84px-p14-d64", r_total=20, merge_counts=counts),
    )
    return model_dir, ckpt, [str(p) for p in paths], loaded, x


def run_json(capsys, *args):
    assert main(["encode", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_encode_prints_counts(setup, capsys):
    model_dir, ckpt, paths, loaded, x = setup
    assert main(["encode", "--model", str(model_dir), "--thresholds", str(ckpt), *paths]) == 0
    out = capsys.readouterr().out
    dymu.patch(loaded.model, ckpt)
    expected = dymu.encode(loaded.model, x, drop_cls=True).num_tokens
    dymu.unpatch(loaded.model)
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert [int(lines[p]) for p in paths] == expected
    assert "tokens (of 36" in out and float(lines["mean"]) == pytest.approx(sum(expected) / len(expected), abs=0.05)

    data = run_json(capsys, "--model", model_dir, "--thresholds", ckpt, "--per-layer", *paths)
    assert [im["tokens"] for im in data["images"]] == expected
    for im in data["images"]:
        layers = im["tokens_per_layer"]
        assert len(layers) == 5 and layers[0] == 36 and layers[-1] == im["tokens"]
        assert layers == sorted(layers, reverse=True)
    assert data["encoder"] == "clip-84px-p14-d64" and data["patch_tokens"] == 36

    # counted at the second-to-last layer (LLaVA-1.5)
    data = run_json(capsys, "--model", model_dir, "--thresholds", ckpt, "--layer", -2, *paths)
    assert data["layer"] == 3 and all(a >= b for a, b in zip([im["tokens"] for im in data["images"]], expected))


def test_offset_and_budget(setup, capsys):
    model_dir, ckpt, paths, _, _ = setup
    base = run_json(capsys, "--model", model_dir, "--thresholds", ckpt, *paths)["mean_tokens"]
    more = run_json(capsys, "--model", model_dir, "--thresholds", ckpt, "--threshold-offset", 0.05, *paths)
    assert more["mean_tokens"] > base and more["threshold_offset"] == 0.05
    for budget in (10, 24):
        data = run_json(capsys, "--model", model_dir, "--thresholds", ckpt, "--token-budget", budget, *paths)
        assert abs(data["mean_tokens"] - budget) <= 1.0 and data["token_budget"] == budget
    assert main(["encode", "--model", str(model_dir), "--thresholds", str(ckpt), "--token-budget", "10", *paths]) == 0
    assert "threshold offset" in capsys.readouterr().out


def test_thresholds_by_dymu_name(setup, capsys, monkeypatch):
    model_dir, ckpt, paths, _, _ = setup
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(ckpt.parent))
    by_name = run_json(capsys, "--model", model_dir, "--thresholds", "clip-84px-p14-d64-tome-16out", *paths)
    by_path = run_json(capsys, "--model", model_dir, "--thresholds", ckpt, *paths)
    assert by_name["images"] == by_path["images"]


def test_encode_errors(setup, capsys, tmp_path):
    model_dir, ckpt, paths, _, _ = setup

    def error(*args):
        assert main(["encode", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert "image not found" in error("--model", model_dir, "--thresholds", ckpt, tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert "cannot read image" in error("--model", model_dir, "--thresholds", ckpt, tmp_path / "junk.png")
    assert "give --thresholds" in error("--model", model_dir, paths[0])
    wrong = save_thresholds(tmp_path / "w.safetensors", ThresholdCheckpoint([0.5] * 4, encoder="ViT-L-14-336"))
    assert "are for encoder 'ViT-L-14-336', not 'clip-84px-p14-d64'" in error(
        "--model", model_dir, "--thresholds", wrong, paths[0]
    )
    short = save_thresholds(tmp_path / "s.safetensors", ThresholdCheckpoint([0.5] * 3, encoder="clip-84px-p14-d64"))
    # (either wording: the library's message names the layer counts of both)
    assert re.search(r"have 3 layers but the model has 4|hold 3 per-layer thresholds .* has 4 blocks",
                     error("--model", model_dir, "--thresholds", short, paths[0]))
    assert "unknown encoder" in error("--model", "ViT-Z-1-tome-10out", paths[0])
    assert "no thresholds for clip-84px-p14-d64-tome-3out" in error(
        "--model", model_dir, "--thresholds", "clip-84px-p14-d64-tome-3out", paths[0]
    )
    assert "--weights is only used with a DyMU name" in error("--model", model_dir, "--weights", model_dir, paths[0])
    # (with thresholds at hand: a missing checkpoint is reported before the model loads)
    assert "is for ViT-L-14-336" in error(
        "--model", "ViT-L-14-336-tome-72out", "--weights", model_dir, "--thresholds", ckpt, paths[0]
    )
    assert "threshold checkpoint not found" in error("--model", model_dir, "--thresholds", tmp_path / "x.safetensors", paths[0])


def test_encode_runs_as_a_program(setup):
    model_dir, ckpt, paths, _, _ = setup
    flat = str(ckpt.parent / "flat2.png")
    make_image("flat", 84, seed=5).save(flat)
    proc = subprocess.run(
        [sys.executable, "-m", "dymu", "encode", "--model", str(model_dir), "--thresholds", str(ckpt), flat, paths[1]],
        capture_output=True, text=True, check=True,
    )
    rows = [line.split() for line in proc.stdout.splitlines()[1:3]]
    assert int(rows[0][1]) * 4 < int(rows[1][1])  # flat vs astronaut


@pytest.mark.filterwarnings("ignore:.*found in 'authors' token order:UserWarning")  # raster on purpose
def test_encode_token_order(setup, capsys):
    model_dir, ckpt, paths, loaded, x = setup
    for order in ("raster", "single"):
        got = run_json(capsys, "--model", model_dir, "--thresholds", ckpt, "--token-order", order, "--batch-size", "1", *paths)
        dymu.patch(loaded.model, ckpt, token_order=order)
        expected = dymu.encode(loaded.model, x, drop_cls=True).num_tokens
        dymu.unpatch(loaded.model)
        assert [img["tokens"] for img in got["images"]] == expected, order
