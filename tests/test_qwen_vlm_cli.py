"""Qwen-VL checkpoints through the entry points: ``dymu.vlm.load`` (the ``dymu`` config block), the baselines by
``method=``, ``dymu generate`` and the lmms-eval plugin (``--model dymu_qwen_vl``) on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dymu import vlm
from dymu.samples import make_image
from dymu.testing import save_tiny_qwen_vlm, write_lmms_vqa_task
from dymu.thresholds import ThresholdCheckpoint, save_thresholds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family a tiny checkpoint whose config.json names its thresholds (relative to the folder)."""
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for family, patch in (("qwen2_vl", 14), ("qwen3_vl", 16)):
        path = save_tiny_qwen_vlm(root / family, family, {"thresholds": "thresholds.safetensors", "vtu": "exact"})
        save_thresholds(path / "thresholds.safetensors",
                        ThresholdCheckpoint(torch.full((2,), 0.3), encoder=f"{family}-p{patch}-d32-l2"))
        out[family] = path
    return out


def images():
    return [make_image("flat", 64), make_image("textured", 90, seed=1)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_load_honours_the_config_block(checkpoints, family):
    model, processor = vlm.load(checkpoints[family])
    assert vlm.dymu_vtu_mode(model) == "exact" and type(model).__name__.startswith("DyMUQwen")
    answers = vlm.answer(model, processor, images(), ["w1 w2", "w3"], max_new_tokens=2)
    assert answers[0].visual_tokens < answers[1].visual_tokens  # flat < textured
    stock, _ = vlm.load(checkpoints[family], dymu=False)
    assert vlm.vlm_state(stock) is None
    with pytest.raises(ValueError, match="downsample"):
        vlm.load(checkpoints[family], downsample="nearest")


def test_enable_dymu_is_the_one_entry(checkpoints, caplog):
    """``enable_dymu`` picks the Qwen adapter by the model's class: the same counts as ``enable_dymu_qwen``, logged
    under the adapter's module; a OneVision model is sent to its own entry, ``enable_dymu_qwen`` refuses LLaVA."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dymu.testing import tiny_llava, tiny_onevision

    model = AutoModelForImageTextToText.from_pretrained(checkpoints["qwen2_vl"]).eval()
    processor = AutoProcessor.from_pretrained(checkpoints["qwen2_vl"])
    counts = {}
    for enable in (vlm.enable_dymu, vlm.enable_dymu_qwen):
        enable(model, [0.3, 0.3], vtu="exact")
        assert vlm.vlm_state(model).family.name == "qwen2_vl" and vlm.dymu_vtu_mode(model) == "exact"
        caplog.clear()
        with caplog.at_level("INFO", logger="dymu.vlm.qwen_vl"):
            answers = vlm.answer(model, processor, images(), ["w1", "w2"], max_new_tokens=1)
        assert "visual tokens per image" in caplog.text
        counts[enable.__name__] = [a.visual_tokens for a in answers]
        vlm.disable_dymu(model)
    assert counts["enable_dymu"] == counts["enable_dymu_qwen"]
    assert counts["enable_dymu"][0] < counts["enable_dymu"][1]  # flat < textured: the thresholds were used
    with pytest.raises(ValueError, match="use enable_dymu_onevision"):
        vlm.enable_dymu(tiny_onevision()[0])
    with pytest.raises(ValueError, match="enable_dymu_qwen expects"):
        vlm.enable_dymu_qwen(tiny_llava()[0])


def test_baselines_keep_the_budget(checkpoints):
    """tome: exactly K per image (one tower call per image size); prune: the K merger outputs of largest norm, in
    raster order; random: seeded (same call twice = same tokens, another seed = others)."""
    path = checkpoints["qwen3_vl"]
    for method in ("tome", "prune", "random"):
        model, processor = vlm.load(path, method=method, token_budget=3)
        inputs = processor(images=images(), text=[processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1"}]}],
            add_generation_prompt=True)] * 2, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        assert out.visual_token_counts == [3, 3], method
        if method == "prune":
            from dymu.vlm import base

            kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
            prep = base.prepare_inputs(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], kw)
            with torch.no_grad():
                full = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
            cells = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
            for f, kept in zip(full.split(cells), prep.encoded.features):
                want = f.norm(dim=-1).topk(3).indices.sort().values
                assert torch.equal(kept, f[want])
        if method == "random":
            from dymu.vlm import base

            kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
            a = base.prepare_inputs(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], dict(kw))
            b = base.prepare_inputs(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], dict(kw))
            c = base.prepare_inputs(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                    dict(kw, selection_seeds=[7, 8]))
            assert all(torch.equal(x, y) for x, y in zip(a.encoded.features, b.encoded.features))
            assert not all(torch.equal(x, y) for x, y in zip(a.encoded.features, c.encoded.features))


@pytest.mark.slow
def test_dymu_generate_cli(checkpoints, tmp_path):
    paths = []
    for i, img in enumerate(images()):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        img.save(tmp_path / f"{i}.png")
    cmd = [sys.executable, "-m", "dymu", "generate", "--model", str(checkpoints["qwen2_vl"]), *paths,
           "--prompt", "w1 w2", "--prompt", "w3", "--max-new-tokens", "2"]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}
    runs = {m: subprocess.run(cmd + extra, capture_output=True, text=True, env=env, timeout=300)
            for m, extra in (("dymu", []), ("tome", ["--method", "tome", "--token-budget", "2"]))}
    for m, run in runs.items():
        assert run.returncode == 0, (m, run.stderr[-2000:])
    counts = [int(line.split("(")[1].split()[0]) for line in runs["dymu"].stdout.splitlines() if line.startswith("[")]
    assert len(counts) == 2 and counts[0] < counts[1]
    assert "(2 visual tokens)" in runs["tome"].stdout


@pytest.mark.slow
def test_lmms_eval_cli(checkpoints, tmp_path):
    """``--model dymu_qwen_vl`` through the real lmms-eval CLI: DyMU from the config block (counts follow the
    images) and ``method=tome,token_budget=2`` (every image keeps 2)."""
    pytest.importorskip("lmms_eval")
    tasks = write_lmms_vqa_task(tmp_path / "tasks", "dymu_tiny_qwen_vqa", [f"w{10 + i}" for i in range(4)],
                                max_new_tokens=2)
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    counts = {}
    for name, extra in (("dymu", ""), ("tome", ",method=tome,token_budget=2")):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "lmms_eval", "--model", "dymu_qwen_vl", "--model_args",
               f"pretrained={checkpoints['qwen2_vl']}{extra}", "--tasks", "dymu_tiny_qwen_vqa", "--include_path",
               str(tasks), "--batch_size", "2", "--device", "cpu", "--output_path", str(out), "--log_samples"]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        found = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        assert any(f.endswith("_results.json") for f in found), (found, run.stdout[-3000:], run.stderr[-3000:])
        results = next(out.glob("*/*_results.json"))
        record = json.loads(results.with_name(results.name.replace("_results", "_dymu_tokens")).read_text())
        counts[name] = [s["visual_tokens"] for s in record["tasks"]["dymu_tiny_qwen_vqa"]["samples"]]
    assert counts["tome"] == [[2]] * 4
    assert len({c[0] for c in counts["dymu"]}) > 1  # content-dependent


def test_dymu_eval_cli(checkpoints, tmp_path, capsys):
    """``dymu eval`` on a Qwen-VL checkpoint: its dymu block turns DyMU on; per-question counts follow content."""
    from dymu.cli import main

    for i, img in enumerate(images()):
        img.save(tmp_path / f"{i}.png")
    (tmp_path / "q.json").write_text(json.dumps([{"image": f"{i}.png", "question": "w1", "answer": "w2"}
                                                 for i in range(2)]))
    out = tmp_path / "out.jsonl"
    assert main(["eval", "--model", str(checkpoints["qwen3_vl"]), "--data", str(tmp_path / "q.json"),
                 "--output", str(out), "--max-new-tokens", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    counts = [r["visual_tokens"] for r in rows]
    assert counts[0] < counts[1], rows
