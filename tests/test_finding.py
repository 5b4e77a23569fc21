"""Threshold finding over an image folder: batching, skipped images, resume after a kill, 2 processes
(torchrun, gloo), the `dymu thresholds` command and threshold_finding.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.cli import main
from dymu.data import read_image_list
from dymu.encoders.loading import load_encoder
from dymu.finding import find_thresholds, resume_path
from dymu.samples import make_image
from dymu.thresholds import load_thresholds, merge_schedule

pytest.importorskip("skimage")

import encoder_zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COUNTS = merge_schedule("constant", 20, encoder_zoo.LAYERS)  # 16 of 36 patch tokens kept
# batch size 4 over 11 entries: batch 0 = 0-3, batch 1 = 4-7 (4 corrupt, 5 missing), batch 2 = 8-10
ENTRIES = ["a.png", "b.png", "photo.jpg", "c.png", "broken.jpg", "gone.png", "d.png", "e.png", "f.png", "g.png", "h.png"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images of varied complexity, one corrupt file and one missing, listed in a JSON file."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("finding")
    images = root / "images"
    images.mkdir()
    kinds = ["flat", "textured", "gradient", "stripes", "textured", "flat", "stripes", "gradient"]
    for name, kind, seed in zip([e for e in ENTRIES if e.endswith(".png") and e != "gone.png"], kinds, range(10)):
        make_image(kind, 100, seed=seed).save(images / name)
    Image.fromarray(data.astronaut()).resize((120, 120)).save(images / "photo.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    records = [{"image": e, "id": i} for i, e in enumerate(ENTRIES)] + [{"id": 99, "conversations": []}]
    (root / "images.json").write_text(json.dumps(records))
    model_dir = encoder_zoo.save_hf_clip(root / "tiny-clip")
    return root, images, model_dir


def manual_thresholds(model_dir, images_dir, batches):
    """Reference: run each batch's readable images in finding mode and average the thresholds."""
    loaded = load_encoder(str(model_dir))
    from PIL import Image

    per_batch = []
    for names in batches:
        x = torch.stack([loaded.preprocess(Image.open(images_dir / n).convert("RGB")) for n in names])
        dymu.patch(loaded.model, merge_counts=COUNTS)
        with torch.no_grad():
            loaded.model(pixel_values=x)
        per_batch.append(dymu.last_run(loaded.model).found_thresholds)
        dymu.unpatch(loaded.model)
    return torch.tensor(per_batch, dtype=torch.float64).mean(0)


def run_find(folder, output=None, **kw):
    root, images, model_dir = folder
    loaded = load_encoder(str(model_dir))
    image_list = read_image_list(root / "images.json", images)
    kw.setdefault("progress", False)
    return find_thresholds(
        loaded.model, image_list, loaded.preprocess, merge_counts=COUNTS, batch_size=4, output=output, **kw
    )


def test_finding_end_to_end_skips_bad_images(folder, tmp_path):
    root, images, model_dir = folder
    out = tmp_path / "t.safetensors"
    result = run_find(folder, out, num_workers=2)
    assert result.finished and result.output == out and not resume_path(out).exists()
    assert result.images_seen == 9 and result.batches_done == result.num_batches == 3
    assert dict(result.skipped) == {"broken.jpg": result.skipped[0][1], "gone.png": "missing"}
    assert result.skipped[0][1].startswith("unreadable")
    # batches are formed by list position; bad images only shrink their own batch
    expected = manual_thresholds(
        model_dir, images, [ENTRIES[0:4], ["d.png", "e.png"], ENTRIES[8:11]]
    )
    ckpt = load_thresholds(out)
    torch.testing.assert_close(ckpt.thresholds.double(), expected, rtol=0, atol=1e-6)
    assert (ckpt.encoder, ckpt.r_total, ckpt.merge_counts, ckpt.images_seen) == ("clip-84px-p14-d64", 20, COUNTS, 9)
    assert read_image_list(root / "images.json", images).without_image == 1
    with pytest.raises(ValueError, match="exists; pass overwrite"):
        run_find(folder, out)


class Killed(Exception):
    pass


def test_resume_after_kill_matches_an_uninterrupted_run(folder, tmp_path):
    reference = run_find(folder)  # in memory, no resume file

    # 1) killed right after batch 0 was saved
    out = tmp_path / "a.safetensors"

    def kill_after_first(batch, running):
        if batch == 0:
            raise Killed

    with pytest.raises(Killed):
        run_find(folder, out, on_batch=kill_after_first)
    assert resume_path(out).exists() and not out.exists()
    resumed = run_find(folder, out)
    assert resumed.resumed_from == 1 and resumed.finished
    assert resumed.images_seen == reference.images_seen == 9
    assert resumed.skipped == reference.skipped
    assert torch.equal(load_thresholds(out).thresholds, reference.checkpoint.thresholds)

    # 2) killed in the middle of batch 2 (while loading an image), after batches 0 and 1 were saved
    out2 = tmp_path / "b.safetensors"
    root, images, model_dir = folder
    loaded = load_encoder(str(model_dir))
    image_list = read_image_list(root / "images.json", images)
    calls = {"n": 0}

    def dying_transform(img):
        calls["n"] += 1
        if calls["n"] == 7:  # 4 readable images in batch 0, 2 in batch 1: the 7th opens batch 2
            raise Killed
        return loaded.preprocess(img)

    with pytest.raises(Killed):
        find_thresholds(loaded.model, image_list, dying_transform, merge_counts=COUNTS, batch_size=4, output=out2, progress=False)
    assert not hasattr(loaded.model, "_dymu_state")  # unpatched on the way out
    state = torch.load(resume_path(out2), weights_only=True)
    assert state["batches_done"] == 2 and state["images_seen"] == 6
    resumed = run_find(folder, out2)
    assert resumed.resumed_from == 2 and resumed.images_seen == 9 and len(resumed.skipped) == 2
    assert torch.equal(load_thresholds(out2).thresholds, reference.checkpoint.thresholds)

    # 3) stopped by max_batches, resumed with other settings: refused; --restart starts over
    out3 = tmp_path / "c.safetensors"
    partial = run_find(folder, out3, max_batches=1)
    assert not partial.finished and partial.output is None and partial.batches_done == 1
    loaded = load_encoder(str(model_dir))
    with pytest.raises(ValueError, match="refusing to resume.*batch_size: 4 then, 2 now"):
        find_thresholds(loaded.model, image_list, loaded.preprocess, merge_counts=COUNTS, batch_size=2, output=out3, progress=False)
    with pytest.raises(ValueError, match="refusing to resume.*merge_counts"):
        find_thresholds(loaded.model, image_list, loaded.preprocess, merge_counts=[6, 6, 4, 4], batch_size=4, output=out3, progress=False)
    restarted = run_find(folder, out3, resume=False)
    assert restarted.resumed_from == 0 and restarted.finished
    assert torch.equal(load_thresholds(out3).thresholds, reference.checkpoint.thresholds)


def test_bad_image_lists(tmp_path):
    (tmp_path / "img").mkdir()
    cases = {
        "empty.json": ("[]", "lists no images"),
        "malformed.json": ('[{"image": "a.png"},', "not valid JSON"),
        "object.json": ('{"image": "a.png"}', "must hold a JSON list"),
        "textonly.json": ('[{"id": 1}, {"id": 2}]', "lists no images .*2 without"),
        "badrecord.json": ('[{"image": "a.png"}, 7]', "record 1 must be an object"),
        "badpath.json": ('[{"image": ["a.png"]}]', "record 0 has"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_image_list(tmp_path / name, tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="image list not found"):
        read_image_list(tmp_path / "nope.json")
    (tmp_path / "ok.json").write_text('["a.png", {"image": "b.png"}]')
    assert read_image_list(tmp_path / "ok.json", max_images=1).paths == ["a.png"]
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        read_image_list(tmp_path / "ok.json", tmp_path / "nodir")


def test_thresholds_command(folder, tmp_path, monkeypatch, capsys):
    root, images, model_dir = folder
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(tmp_path / "ckpts"))
    common = ["thresholds", "--model", str(model_dir), "--data", str(root / "images.json"), "--image-dir", str(images)]
    common += ["--batch-size", "4", "--num-workers", "0", "--quiet"]
    assert main(common + ["--out-tokens", "16", "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "run the same command again to resume" in out and "1/3 batches" in out
    assert main(common + ["--out-tokens", "16"]) == 0
    out = capsys.readouterr().out
    default = tmp_path / "ckpts" / "clip-84px-p14-d64-tome-16out.safetensors"
    assert f"wrote {default}" in out and "(resumed after batch 1)" in out
    assert "skipped 2 image(s): broken.jpg (unreadable" in out and "gone.png (missing)" in out
    assert "images seen: 9" in out and "records without an image key (ignored): 1" in out
    reference = run_find(folder)
    torch.testing.assert_close(load_thresholds(default).thresholds, reference.checkpoint.thresholds, rtol=0, atol=0)
    assert load_thresholds(default).token_order == "authors"  # the order finding used is recorded
    # the same budget given as r_total, with a linear schedule: another default name
    assert main(common + ["--r-total", "20", "--schedule", "linear"]) == 0
    linear = load_thresholds(tmp_path / "ckpts" / "clip-84px-p14-d64-tome-16out-linear.safetensors")
    assert linear.merge_counts == merge_schedule("linear", 20, 4) and linear.schedule == "linear"
    capsys.readouterr()

    # errors are reported, not raised
    def error(args):
        assert main(args) == 2
        return capsys.readouterr().err

    assert "give the budget" in error(common)
    assert "r_total must be in [0, 36)" in error(common + ["--r-total", "40"])
    assert "is for ViT-L-14-336" in error(common[:1] + ["--model", "ViT-L-14-336-tome-72out", "--weights", str(model_dir)] + common[3:])
    assert "unknown encoder" in error(common[:1] + ["--model", "ViT-Q-9-tome-72out"] + common[3:])
    (tmp_path / "bad.json").write_text("[")
    assert "not valid JSON" in error(["thresholds", "--model", str(model_dir), "--data", str(tmp_path / "bad.json"), "--out-tokens", "16"])
    (tmp_path / "empty.json").write_text("[]")
    assert "lists no images" in error(["thresholds", "--model", str(model_dir), "--data", str(tmp_path / "empty.json"), "--out-tokens", "16"])
    assert "model folder not found" in error(common[:1] + ["--model", str(tmp_path / "nomodel")] + common[3:] + ["--out-tokens", "16"])


def test_thresholds_command_open_clip(folder, tmp_path, capsys):
    pytest.importorskip("open_clip")
    root, images, _ = folder
    directory = encoder_zoo.save_open_clip(tmp_path / "oc")
    out = tmp_path / "oc.safetensors"
    args = ["thresholds", "--model", f"open_clip:local-dir:{directory}", "--data", str(root / "images.json")]
    args += ["--image-dir", str(images), "--batch-size", "4", "--num-workers", "0", "--quiet", "--out-tokens", "16", "-o", str(out)]
    assert main(args) == 0
    ckpt = load_thresholds(out)
    assert ckpt.encoder == "clip-84px-p14-d64" and ckpt.images_seen == 9 and ckpt.num_layers == 4


def test_two_processes_match_one(folder, tmp_path):
    """threshold_finding.sh with NPROC=2: torchrun, gloo. Rank 0's slice of batch 1 is the corrupt and the
    missing image, so that rank takes part in the selection with no image at all."""
    root, images, model_dir = folder
    out = tmp_path / "two.safetensors"
    env = dict(
        os.environ,
        MODEL=str(model_dir),
        DATA=str(root / "images.json"),
        IMAGE_DIR=str(images),
        BATCH_SIZE="4",
        NUM_WORKERS="0",
        NPROC="2",
        OUTPUT=str(out),
        PYTHON=sys.executable,
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "threshold_finding.sh"), "--out-tokens", "16", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stdout and "images seen: 9" in proc.stdout
    assert proc.stdout.count("wrote ") == 1  # rank 0 only
    two = load_thresholds(out)
    one = run_find(folder).checkpoint
    assert two.images_seen == one.images_seen == 9
    torch.testing.assert_close(two.thresholds, one.thresholds, rtol=0, atol=1e-6)
    # the design matters: averaging per-process thresholds of per-process slices (the authors' DDP scheme)
    # gives other values, so a 2-process run without the global selection would fail the check above
    shards = [[ENTRIES[0:2], ENTRIES[2:4]], [["d.png", "e.png"]], [ENTRIES[8:10], ENTRIES[10:11]]]
    per_process = torch.stack([manual_thresholds(model_dir, images, [s]) for batch in shards for s in batch])
    per_batch = torch.stack([per_process[0:2].mean(0), per_process[2], per_process[3:5].mean(0)]).mean(0)
    assert float((per_batch.float() - one.thresholds).abs().max()) > 1e-3


def test_finding_leaves_the_running_mean_unreduced(folder, monkeypatch):
    """The selection across processes already gives every process the same thresholds: finding's running mean
    does not all-reduce them again; a RunningThresholds made by hand (the authors' per-process scheme) still does."""
    import dymu.thresholds

    reduced = []
    monkeypatch.setattr(dymu.thresholds, "all_reduce_mean", lambda values: reduced.append(values) or values)
    result = run_find(folder)
    assert result.finished and result.batches_done == 3 and reduced == []
    dymu.thresholds.RunningThresholds(2).update([0.1, 0.2])
    assert len(reduced) == 1
