"""Loading LLaVA-OneVision with DyMU (dymu.vlm.load / load_onevision and the ``dymu`` config block), the command line
(``dymu generate``, ``dymu encode``, ``dymu convert-onevision``) and the lmms-eval backend ``dymu_llava_onevision``
(the real ``python -m lmms_eval`` CLI on a tiny local task), on a tiny random OneVision saved with
``save_pretrained`` and thresholds found for its SigLIP tower."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from dymu.cli import main
from dymu.samples import make_image
from dymu.testing import LMMS_TASK_UTILS, find_and_save_thresholds, save_tiny_llava
from dymu.thresholds import ThresholdCheckpoint, save_thresholds
from dymu.vlm import dymu_vtu_mode, load, load_llava, load_onevision
from dymu.vlm.base import vlm_state
from dymu.vlm.settings import ConfigBlock
from dymu.testing import tiny_onevision
from dymu.vlm.onevision import enable_dymu_onevision, image_crops, stock_visual_tokens

R_TOTAL = 9  # tiny SigLIP: 3 blocks, 16 patches per crop -> 3 merges per block when finding


def images():
    # (W, H): a 2×3-tile grid unpadded in width, a wide 3×1 flat one, one of a single tile
    return [
        make_image("textured", 40, seed=1).resize((40, 60)),
        make_image("flat", 30, seed=3).resize((84, 30)),
        make_image("textured", 28, seed=4),
    ]


def write_block(folder: Path, block: dict) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["dymu"] = block
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The stock folder, a copy with a ``dymu`` block + its thresholds file, image files."""
    root = tmp_path_factory.mktemp("ov_load")
    model, processor = tiny_onevision()
    stock = root / "stock"
    model.save_pretrained(stock)
    processor.save_pretrained(stock)
    finding = [make_image("textured", 56, seed=s) for s in (5, 6, 7)]  # not the test images
    thresholds = find_and_save_thresholds(model.model.vision_tower, image_crops(model, processor, finding), R_TOTAL,
                                          root / "tiny-ov.safetensors")
    dymu_dir = root / "dymu"
    shutil.copytree(stock, dymu_dir)
    shutil.copy(thresholds, dymu_dir / "tiny-ov.safetensors")
    write_block(dymu_dir, {"thresholds": "tiny-ov.safetensors", "vtu": "exact", "downsample": "error"})
    paths = []
    for i, img in enumerate(images()):
        paths.append(root / f"img{i}.png")
        img.save(paths[-1])
    return {"root": root, "stock": stock, "dymu": dymu_dir, "thresholds": thresholds, "processor": processor,
            "paths": [str(p) for p in paths]}


def batch(processor, n=2):
    processor.tokenizer.padding_side = "left"
    texts = ["w1 <image> w2", "w3 w4 <image>", "<image> w5"][:n]
    return processor(images=images()[:n], text=texts, return_tensors="pt", padding=True)


def stock_model(work):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(work["stock"]).eval()


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


# ---------------------------------------------------------------------------------------------- loading
def test_dymu_block_equals_enable_on_the_stock_model(work):
    inputs = batch(work["processor"])
    reference = enable_dymu_onevision(stock_model(work), work["thresholds"], vtu="exact", downsample="error")
    with torch.no_grad():
        ref_out = reference(**inputs)
    want = ref_out.logits
    for loader in (load, load_onevision):
        model, processor = loader(work["dymu"])
        assert type(processor).__name__ == "LlavaOnevisionProcessor"
        assert dymu_vtu_mode(model) == "exact" and vlm_state(model).options["downsample"] == "error"
        with torch.no_grad():
            out = model(**inputs)
        assert torch.equal(out.logits, want)
        assert out.visual_token_counts == ref_out.visual_token_counts
        assert out.crop_token_counts == ref_out.crop_token_counts
    assert sum(ref_out.visual_token_counts) < int((inputs["input_ids"] == reference.config.image_token_id).sum())
    # keyword arguments override the block
    model, _ = load(work["dymu"], vtu="fast", downsample="nearest", threshold_offset=-0.2)
    assert dymu_vtu_mode(model) == "fast" and vlm_state(model).options["downsample"] == "nearest"
    assert model.model.vision_tower._dymu_state.threshold_offset == -0.2


def test_merging_off_and_dymu_false_equal_the_stock_model(work):
    inputs = batch(work["processor"])
    stock = stock_model(work)
    want = logits(stock, inputs)
    with torch.no_grad():
        want_gen = stock.generate(**inputs, max_new_tokens=3, do_sample=False)
    off, _ = load(work["stock"], dymu=True)  # no thresholds: merging off
    assert dymu_vtu_mode(off) == "fast"
    assert (logits(off, inputs) - want).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(off.generate(**inputs, max_new_tokens=3, do_sample=False), want_gen)
    plain, _ = load(work["dymu"], dymu=False)  # the block is ignored
    assert type(plain) is LlavaOnevisionForConditionalGeneration and dymu_vtu_mode(plain) is None
    assert torch.equal(logits(plain, inputs), want)
    again, _ = load(work["stock"])  # no block, no thresholds: stock
    assert type(again) is LlavaOnevisionForConditionalGeneration
    # the stock counts the CLI and lmms-eval report: the processor's placeholders per image
    placeholders = (inputs["input_ids"] == stock.config.image_token_id).sum(1).tolist()
    assert stock_visual_tokens(stock, inputs["image_sizes"]) == placeholders


def test_bad_blocks_are_refused_clearly(work, tmp_path):
    bad = shutil.copytree(work["stock"], tmp_path / "bad")
    write_block(bad, {"thresholds": "x.safetensors", "vtu_mode": "fast"})
    expected = r"unknown keys in the 'dymu' config block: \['vtu_mode'\]; expected encoder, thresholds, vtu, threshold_offset, downsample"
    with pytest.raises(ValueError, match=expected):
        load(bad)
    write_block(bad, {"downsample": "bilinear"})
    with pytest.raises(ValueError, match="dymu.downsample must be 'nearest' or 'error', got 'bilinear'"):
        load_onevision(bad)
    write_block(bad, {"vtu": "slow"})
    with pytest.raises(ValueError, match="dymu.vtu"):
        load(bad)
    # LLaVA-1.5's block keeps its own keys (no downsample)
    with pytest.raises(ValueError, match=r"\['downsample'\]; expected encoder, thresholds, vtu, threshold_offset$"):
        ConfigBlock.from_dict({"downsample": "nearest"})


def test_each_loader_refuses_the_other_family(work, tmp_path):
    with pytest.raises(ValueError, match=r"is a LLaVA-OneVision checkpoint .* dymu.vlm.load .* dymu.vlm.load_onevision"):
        load_llava(work["dymu"])
    llava = save_tiny_llava(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"not a LLaVA-OneVision checkpoint \(model_type 'llava'.*load_llava"):
        load_onevision(llava)
    model, _ = load(llava)  # dispatch: LLaVA-1.5 goes to load_llava
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    with pytest.raises(ValueError, match="downsample is for LLaVA-OneVision"):
        load(llava, downsample="error")
    with pytest.raises(ValueError, match="vision_tower is for original LLaVA-1.5"):
        load(work["stock"], vision_tower="google/siglip-so400m-patch14-384")
    original = tmp_path / "lmms-lab-ov"
    original.mkdir()
    (original / "config.json").write_text(json.dumps(
        {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "mm_vision_tower": "google/siglip-so400m-patch14-384"}
    ))
    for loader in (load, load_llava, load_onevision):
        with pytest.raises(ValueError, match="original LLaVA-OneVision checkpoint .* llava-hf conversion"):
            loader(original)


# ---------------------------------------------------------------------------------------------- command line
LINE = re.compile(r"^\[(?P<image>[^\]]+)\] \((?P<n>\d+) of (?P<full>\d+) visual tokens\) ", re.M)


def expected_counts(work, paths):
    """DyMU and stock visual tokens per image, from the library, for single-image prompts."""
    from dymu.data import load_image

    model, processor = load(work["dymu"])
    processor.tokenizer.padding_side = "left"
    pil = [load_image(p) for p in paths]
    inputs = processor(images=pil, text=["<image> w1"] * len(pil), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    return out.visual_token_counts, placeholders, out.crop_token_counts


def test_generate_cli(work, capsys):
    paths = work["paths"][:2]
    counts, stock, crops = expected_counts(work, paths)
    argv = ["generate", "--model", str(work["dymu"]), "--image", paths[0], "--image", paths[1], "--prompt", "w1",
            "--max-new-tokens", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    found = {m["image"]: (int(m["n"]), int(m["full"])) for m in LINE.finditer(out)}
    assert found == {p: (c, s) for p, c, s in zip(paths, counts, stock)}, out
    assert f"[{paths[0]}] tokens per crop (base, then tiles): {' '.join(map(str, crops[0]))}" in out
    assert main(argv + ["--no-dymu"]) == 0  # the stock model: every placeholder
    out = capsys.readouterr().out
    assert {m["image"]: (int(m["n"]), int(m["full"])) for m in LINE.finditer(out)} == {p: (s, s) for p, s in zip(paths, stock)}
    assert main(argv + ["--token-budget", "8"]) == 0
    assert re.search(r"threshold offset for 8 visual tokens per crop: [+-]\d", capsys.readouterr().out)
    assert main(["generate", "--model", str(work["stock"]), "--image", paths[0], "--prompt", "w1", "--token-budget", "8"]) == 2
    assert "--token-budget needs --thresholds" in capsys.readouterr().err


def test_encode_cli(work, capsys):
    paths = work["paths"]
    counts, stock, crops = expected_counts(work, paths)
    assert main(["encode", "--model", str(work["dymu"]), *paths, "--json", "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [i["tokens_per_crop"] for i in out["images"]] == crops
    assert [i["crops"] for i in out["images"]] == [len(c) for c in crops] and min(map(len, crops)) > 1  # base + tiles
    assert [i["visual_tokens"] for i in out["images"]] == counts
    assert [i["stock_visual_tokens"] for i in out["images"]] == stock
    assert out["patch_tokens_per_crop"] == 16 and out["layer"] == -1
    assert out["mean_tokens_per_crop"] == pytest.approx(sum(map(sum, crops)) / sum(map(len, crops)))
    assert main(["encode", "--model", str(work["dymu"]), *paths]) == 0
    text = capsys.readouterr().out
    assert f"{' '.join(map(str, crops[0]))}" in text and f"  {counts[1]} ({stock[1]})  " in text
    # thresholds on the command line, for the stock folder; a budget per crop
    assert main(["encode", "--model", str(work["stock"]), "--thresholds", str(work["thresholds"]), *paths,
                 "--json", "--token-budget", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_budget"] == 6 and out["mean_tokens_per_crop"] == pytest.approx(6, abs=1.5)
    assert main(["encode", "--model", str(work["stock"]), *paths]) == 2
    assert "give --thresholds" in capsys.readouterr().err


def test_convert_onevision_writes_a_block_that_loads(work, tmp_path, capsys):
    out = tmp_path / "converted"
    argv = ["convert-onevision", str(work["stock"]), str(out), "--thresholds", str(work["thresholds"])]
    assert main(argv + ["--vtu", "fast", "--downsample", "error"]) == 0
    block = json.loads((out / "config.json").read_text())["dymu"]
    assert block == {"thresholds": "tiny-ov.safetensors", "vtu": "fast", "threshold_offset": 0.0, "downsample": "error"}
    assert (out / "tiny-ov.safetensors").is_file()
    inputs = batch(work["processor"])
    reference = enable_dymu_onevision(stock_model(work), work["thresholds"], downsample="error")
    model, _ = load(out)
    assert vlm_state(model).options["downsample"] == "error"
    assert torch.equal(logits(model, inputs), logits(reference, inputs))
    # in place: the output is the source
    assert main(["convert-onevision", str(out), str(out), "--thresholds", str(out / "tiny-ov.safetensors"),
                 "--vtu", "exact"]) == 0
    assert json.loads((out / "config.json").read_text())["dymu"]["vtu"] == "exact"
    capsys.readouterr()
    # refused before anything is written
    assert main(argv) == 2 and "is not an empty folder" in capsys.readouterr().err
    other = save_thresholds(tmp_path / "clip.safetensors", ThresholdCheckpoint(torch.zeros(3), encoder="clip-56px-p14-d64"))
    assert main(["convert-onevision", str(work["stock"]), str(tmp_path / "o2"), "--thresholds", str(other)]) == 2
    assert "does not fit this checkpoint's SigLIP tower" in capsys.readouterr().err
    llava = save_tiny_llava(tmp_path / "llava")
    assert main(["convert-onevision", str(llava), str(tmp_path / "o3"), "--thresholds", str(work["thresholds"])]) == 2
    assert "for LLaVA-1.5 use dymu convert-llava" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# ---------------------------------------------------------------------------------------------- lmms-eval
TASK_UTILS = LMMS_TASK_UTILS
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: {kind}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
{extra}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""
VQA = dict(name="dymu_ov_vqa", kind="generate_until", metric="exact_match", extra=(
    "doc_to_target: answer\ngeneration_kwargs:\n  max_new_tokens: 2\n  do_sample: false\n"
    "process_results: !function utils.process_results"))
LL = dict(name="dymu_ov_ll", kind="loglikelihood", metric="logprob", extra=(
    'doc_to_target: " w5 w6"\nprocess_results: !function utils.ll_process_results'))


@pytest.fixture(scope="module")
def tasks(work):
    folder = work["root"] / "tasks"
    folder.mkdir()
    rows = [{"id": i, "image": p, "question": f"w{10 + i}", "answer": "w5"} for i, p in enumerate(work["paths"])]
    (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(TASK_UTILS)
    for task in (VQA, LL):
        (folder / f"{task['name']}.yaml").write_text(TASK_YAML.format(**task))
    return folder


def test_lmms_eval_cli_end_to_end(work, tasks):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'dymu[eval]')")
    root, out = work["root"], work["root"] / "lmms_out"
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "dymu_llava_onevision", "--model_args",
         f"pretrained={work['dymu']},vtu=fast", "--tasks", "dymu_ov_vqa,dymu_ov_ll", "--include_path", str(tasks),
         "--batch_size", "2", "--device", "cpu", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    results_files = list(out.glob("*/*_results.json"))
    assert len(results_files) == 1, log[-4000:]
    results = json.loads(results_files[0].read_text())
    assert "exact_match,none" in results["results"]["dymu_ov_vqa"]
    assert results["results"]["dymu_ov_ll"]["logprob,none"] < 0
    record = json.loads(results_files[0].with_name(results_files[0].name.replace("_results", "_dymu_tokens")).read_text())
    assert record["model"] == "dymu_llava_onevision" and record["full_tokens_per_image"] is None
    assert record["settings"]["vtu"] == "fast" and record["settings"]["merging"]
    assert record["settings"]["token_order"] == "batch" and record["settings"]["downsample"] == "error"  # the block's
    counts, _, _ = expected_counts(work, work["paths"])
    for task in ("dymu_ov_vqa", "dymu_ov_ll"):  # per image, what the library gives (batch-independent)
        assert [s["visual_tokens"] for s in record["tasks"][task]["samples"]] == [[c] for c in counts]
    assert results["throughput"]["avg_dymu_images"] == 6


def test_lmms_eval_backend_stock_counts_budget_and_refusals(work, tasks):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'dymu[eval]')")
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from dymu.lmms_eval.onevision import DyMULlavaOneVision

    docs = [{"image": p, "q": f"w{10 + i}"} for i, p in enumerate(work["paths"])]

    def visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    def req(kind, args):
        return Instance(kind, args, 0, metadata={"task": args[-2], "doc_id": args[-3], "repeats": 1})

    _, stock, _ = expected_counts(work, work["paths"])
    for kw, check in (({"dymu": False}, "stock"), ({"token_budget": 6}, "budget")):
        lm = DyMULlavaOneVision(pretrained=str(work["dymu"]), device="cpu", batch_size=2, **kw)
        lm.task_dict = {"t": {"test": docs}}
        gen = lm.generate_until([req("generate_until", (d["q"], {"max_new_tokens": 2}, visual, i, "t", "test"))
                                 for i, d in enumerate(docs)])
        ll = lm.loglikelihood([req("loglikelihood", (d["q"], " w5", visual, i, "t", "test")) for i, d in enumerate(docs)])
        assert len(gen) == len(ll) == 3 and all(lp < 0 for lp, _ in ll)
        samples = [s["visual_tokens"] for s in lm.token_record()["tasks"]["t"]["samples"]]
        if check == "stock":  # the stock model's own count per image (anyres: it depends on the size)
            assert samples == [[s] for s in stock] and gen[0].token_counts.input_tokens == stock[0] + 3  # USER: w10 ASSISTANT:
        else:
            assert lm.settings["threshold_offset"] != 0 and samples != [[s] for s in stock]
    # video, vision_tower, unknown args, a LLaVA-1.5 folder: refused with dymu's messages
    lm.task_dict = {"v": {"test": [{"video": "clip.mp4"}]}}
    with pytest.raises(ValueError, match="gave a video visual .* video is not supported with DyMU yet"):
        lm.generate_until([req("generate_until", ("w1", {}, lambda d: [d["video"]], 0, "v", "test"))])
    with pytest.raises(ValueError, match="dymu_llava_onevision: vision_tower is for original LLaVA-1.5"):
        DyMULlavaOneVision(pretrained=str(work["dymu"]), vision_tower="x")
    with pytest.raises(ValueError, match=r"dymu_llava_onevision: unknown model_args \['tower'\]; accepted: .*downsample"):
        DyMULlavaOneVision(pretrained=str(work["dymu"]), tower="x")
    llava = save_tiny_llava(work["root"] / "llava")
    with pytest.raises(ValueError, match="dymu_llava_onevision: cannot load .* not a LLaVA-OneVision .* --model dymu_llava$"):
        DyMULlavaOneVision(pretrained=str(llava), device="cpu")
    from dymu.lmms_eval.llava import DyMULlava

    with pytest.raises(ValueError, match="dymu_llava: cannot load .* use --model dymu_llava_onevision"):
        DyMULlava(pretrained=str(work["dymu"]), device="cpu")
