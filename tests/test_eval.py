"""Evaluation without lmms-eval: `dymu eval` on a local JSON (unreadable image, resume), log-likelihoods, the
results table script on recorded lmms-eval result files."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from dymu.evaluation import (
    Prompt,
    chat_text,
    exact_match,
    generate,
    loglikelihood,
    normalize_answer,
    normalized_match,
    pooled_stats,
    set_token_order,
    token_stats,
)
from dymu.samples import image_set
from dymu.testing import save_tiny_llava
from dymu.thresholds import ThresholdCheckpoint, save_thresholds
from dymu.vlm import disable_dymu, enable_dymu, load_llava

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.8  # on the tiny tower: generated images keep 2..16 of 16 tokens


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"), image_size=56)


@pytest.fixture(scope="module")
def thresholds_file(tmp_path_factory):
    ckpt = ThresholdCheckpoint(torch.full((4,), THRESHOLD), encoder="clip-56px-p14-d64")
    return save_thresholds(tmp_path_factory.mktemp("thr") / "tiny.safetensors", ckpt)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    records = []
    for i, img in enumerate(image_set(5, 64)):
        img.save(root / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "question": f"w{10 + i} w{20 + i}", "answer": ["w5", "W5."]})
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not an image")
    records.insert(2, {"image": "images/broken.png", "question": "w30", "answer": "w5"})
    (root / "vqa.json").write_text(json.dumps(records))
    return root / "vqa.json"


# ---------------------------------------------------------------------------------------------- dymu eval
def test_dymu_eval_unreadable_image_and_resume(llava_dir, thresholds_file, questions, tmp_path, capsys):
    from dymu.cli import main

    base = ["eval", "--model", str(llava_dir), "--data", str(questions), "--thresholds", str(thresholds_file),
            "--batch-size", "2", "--max-new-tokens", "3", "--no-progress"]
    full = tmp_path / "full.jsonl"
    assert main(base + ["--output", str(full)]) == 0
    out = capsys.readouterr().out
    assert "5 of 6 questions answered" in out and "1 unreadable image(s)" in out and "broken.png" in out
    assert "visual tokens:" in out and "±" in out
    lines = full.read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["index"] for r in records] == list(range(6))
    assert records[2]["error"] and "cannot read image" in records[2]["error"] and records[2]["prediction"] is None
    counts = [c for r in records if r["error"] is None for c in r["visual_tokens"]]
    assert len(counts) == 5 and len(set(counts)) > 1  # images keep different numbers of tokens (batched together)
    summary = json.loads((tmp_path / "full.jsonl.summary.json").read_text())
    assert summary["answered"] == 5 and summary["unreadable"] == ["images/broken.png"]
    assert summary["tokens"]["images"] == 5 and summary["tokens"]["mean"] == pytest.approx(sum(counts) / 5)

    # an interrupted run: 3 questions written, then a torn line; the rerun continues and ends equal
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    shutil.copy(tmp_path / "full.jsonl.meta.json", tmp_path / "part.jsonl.meta.json")
    assert main(base + ["--output", str(part)]) == 0
    out = capsys.readouterr().out
    assert "(resumed after 3)" in out
    assert part.read_bytes() == full.read_bytes()
    resumed = json.loads((tmp_path / "part.jsonl.summary.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "output"} == {k: v for k, v in summary.items() if k != "output"}

    # a finished run reruns as a no-op; other settings on the same output are refused
    assert main(base + ["--output", str(full)]) == 0
    assert full.read_bytes() == part.read_bytes()
    capsys.readouterr()
    assert main(base[:-3] + ["--max-new-tokens", "4", "--no-progress", "--output", str(full)]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    "block, flag, expected",
    [
        ({"prompt_suffix": ""}, None, ""),  # the small VLM's format: the bare question
        ({"prompt_suffix": " Reply in one word."}, None, " Reply in one word."),
        (None, None, "\nAnswer the question using a single word or phrase."),  # LLaVA-1.5 keeps its default
        ({"prompt_suffix": " Reply in one word."}, "", ""),  # the flag wins
    ],
)
def test_dymu_eval_uses_the_checkpoints_prompt_suffix(llava_dir, questions, tmp_path, monkeypatch, block, flag, expected):
    """`dymu eval` appends the prompt suffix the checkpoint records (its config's "dymu" block, which
    build_small_vlm fills from the projector file), else LLaVA-1.5's short-answer instruction; a block holding
    only the prompt format leaves DyMU off (every image keeps its 16 tokens)."""
    import dymu.evaluation.quick_eval
    from dymu.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(llava_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if block is not None:
        config["dymu"] = block
    (model_dir / "config.json").write_text(json.dumps(config))
    seen: list[str] = []
    real_generate = dymu.evaluation.quick_eval.generate

    def recording(model, processor, prompts, **kwargs):
        seen.extend(p.text for p in prompts)
        return real_generate(model, processor, prompts, **kwargs)

    monkeypatch.setattr(dymu.evaluation.quick_eval, "generate", recording)
    out = tmp_path / "run.jsonl"
    args = ["eval", "--model", str(model_dir), "--data", str(questions), "--max-new-tokens", "1", "--no-progress",
            "--output", str(out)] + ([] if flag is None else ["--prompt-suffix", flag])
    assert main(args) == 0
    asked = [q["question"] for q in json.loads(questions.read_text()) if "broken" not in q["image"]]
    assert seen == [q + expected for q in asked]
    assert json.loads((tmp_path / "run.jsonl.meta.json").read_text())["prompt_suffix"] == expected
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [c for r in records for c in r["visual_tokens"]] == [16] * 5


def test_dymu_eval_bad_input(llava_dir, tmp_path, capsys):
    from dymu.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.png", "question": "w1"}]))
    assert main(["eval", "--model", str(llava_dir), "--data", str(bad)]) == 2
    assert "lacks ['answer']" in capsys.readouterr().err
    assert main(["eval", "--model", str(llava_dir), "--data", str(tmp_path / "none.json")]) == 2
    assert "question list not found" in capsys.readouterr().err


def test_answer_matching():
    assert normalize_answer("  The Red, cat!") == "red cat"
    assert exact_match(" w5 ", ["w5"]) and not exact_match("W5", ["w5"])
    assert normalized_match("W5.", ["w5"]) and normalized_match("a dog", ["the dog", "cat"])
    assert not normalized_match("dogs", ["dog"])


def test_token_stats_pool_exactly():
    a, b = [2, 4, 9], [16, 3]
    pooled = pooled_stats([token_stats(a), token_stats(b)])
    direct = token_stats(a + b)
    for key in ("images", "mean", "std", "min", "max"):
        assert pooled[key] == pytest.approx(direct[key])
    assert direct["std"] == pytest.approx(torch.tensor(a + b, dtype=torch.float64).std(unbiased=False).item())


# ---------------------------------------------------------------------------------------------- log-likelihood
def test_loglikelihood_is_the_continuations_summed_logprob(llava_dir, thresholds_file):
    model, processor = load_llava(llava_dir, dymu=False)
    images = image_set(3, 64)
    prompts = [Prompt("w1 w2", [images[0]]), Prompt("w3", [images[1]]), Prompt("w4 w5 w6", [])]
    conts = [" w7 w8", " w9", " w10 w11 w12"]
    got = loglikelihood(model, processor, prompts, conts)
    tok = processor.tokenizer
    for p, c, r in zip(prompts, conts, got):  # by hand, one prompt at a time, on the stock model
        context = chat_text(processor, p.text, len(p.images))
        inputs = processor(images=p.images or None, text=[context + c], return_tensors="pt")
        n = len(tok(context + c)["input_ids"]) - len(tok(context)["input_ids"])
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        target = inputs["input_ids"][0, -n:]
        expected = torch.log_softmax(logits[-n - 1 : -1], -1).gather(-1, target[:, None]).sum()
        assert r.num_tokens == n == len(c.split())
        assert r.logprob == pytest.approx(float(expected), abs=1e-4)
        assert r.logprob < 0 and r.visual_tokens == [16] * len(p.images)
    # greedy: a continuation made of the model's own greedy tokens is recognised as such
    gen = generate(model, processor, prompts[:1], max_new_tokens=2)[0]
    assert loglikelihood(model, processor, prompts[:1], [" " + gen.text])[0].is_greedy

    # DyMU on: a batch equals its prompts one by one, and merged images are counted
    enable_dymu(model, thresholds_file, vtu="fast")
    assert set_token_order(model) == "single"  # each image merged as alone: batch-invariant counts
    batch = loglikelihood(model, processor, prompts, conts)
    for p, c, b in zip(prompts, conts, batch):
        one = loglikelihood(model, processor, [p], [c])[0]
        assert one.logprob == pytest.approx(b.logprob, abs=1e-4) and one.visual_tokens == b.visual_tokens
    assert batch[0].visual_tokens[0] < 16
    disable_dymu(model)


# ---------------------------------------------------------------------------------------------- results table
def _results(path, scores, date, throughput=None, tokens=None):
    """A minimal lmms-eval results file (and the plugin's token record beside it)."""
    from dymu.lmms_eval.table import BENCHMARKS

    by_label = {b.label: b for b in BENCHMARKS}
    results = {}
    for label, value in scores.items():
        b = by_label[label]
        results[b.task] = {"alias": b.task, b.metric: value, b.metric.replace(",", "_stderr,"): 0.01}
    path.mkdir(parents=True, exist_ok=True)
    data = {"results": results, "config": {"model": "dymu_llava"}, "throughput": throughput or {}}
    (path / f"{date}_results.json").write_text(json.dumps(data))
    if tokens is not None:
        record = {"tasks": {task: {"samples": [{"split": "test", "doc_id": i, "visual_tokens": [c]} for i, c in enumerate(cs)]}
                            for task, cs in tokens.items()}}
        (path / f"{date}_dymu_tokens.json").write_text(json.dumps(record))


def test_make_table_reproduces_hand_computed_table(tmp_path, capsys):
    import runpy

    root = tmp_path / "logs"
    # full model: the paper's LLaVA-1.5-7B numbers, in lmms-eval's units (0..1 accuracies); tokens only as the
    # summary the plugin writes into the results file
    _results(root / "full" / "llava", {"GQA": 0.62, "MMB": 64.6, "MME": 1506.0, "POPE": 0.869, "SQA-I": 0.694,
             "SEED-I": 0.662, "TextVQA": 0.583, "MMVet": 30.7, "LLaVA-W": 63.5}, "20250101_000000",
             throughput={"avg_dymu_images": 4, "avg_dymu_visual_tokens_mean": 576.0, "avg_dymu_visual_tokens_std": 0.0})
    # DyMU-low in two runs: an older one for everything (its GQA superseded), a newer one redoing GQA and POPE
    _results(root / "low" / "llava", {"GQA": 0.5, "MMB": 62.1, "MME": 1438.0, "POPE": 0.1, "SQA-I": 0.693,
             "SEED-I": 0.650, "TextVQA": 0.531, "MMVet": 30.0, "LLaVA-W": 62.9}, "20250101_000000",
             tokens={"gqa": [300, 300], "mme": [89, 89]})
    _results(root / "low" / "llava", {"GQA": 0.608, "POPE": 0.863}, "20250102_000000",
             tokens={"gqa": [80, 100], "pope": [60, 116]})
    argv = ["make_table.py", str(root), "--output", str(tmp_path / "table")]
    import sys

    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "eval_scripts" / "make_table.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert done.value.code == 0
    # by hand: tokens of low = 80, 100, 60, 116, 89, 89 (the old GQA counts superseded): mean 89,
    # std sqrt((81 + 121 + 841 + 729) / 6) = 17.19; average of score / full over the nine benchmarks:
    # (60.8/62 + 62.1/64.6 + 1438/1506 + 86.3/86.9 + 69.3/69.4 + 65/66.2 + 53.1/58.3 + 30/30.7 + 62.9/63.5) / 9
    # = 97.21 %
    expected = (
        "| Setting | Visual tokens | GQA | MMB | MME | POPE | SQA-I | SEED-I | TextVQA | MMVet | LLaVA-W | Avg (% of full) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| full | 576 ± 0 | 62.0 | 64.6 | 1506 | 86.9 | 69.4 | 66.2 | 58.3 | 30.7 | 63.5 | 100.0 |\n"
        "| low | 89 ± 17 | 60.8 | 62.1 | 1438 | 86.3 | 69.3 | 65.0 | 53.1 | 30.0 | 62.9 | 97.2 |\n"
    )
    assert capsys.readouterr().out == expected
    assert (tmp_path / "table.md").read_text() == expected
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    assert [r["setting"] for r in rows] == ["full", "low"]
    low = rows[1]
    assert float(low["tokens_mean"]) == pytest.approx(89) and float(low["tokens_std"]) == pytest.approx(17.1853, abs=1e-4)
    assert int(low["images"]) == 6 and int(low["avg_benchmarks"]) == 9
    assert float(low["avg_pct_of_full"]) == pytest.approx(97.2097, abs=1e-3)
    assert float(low["GQA"]) == pytest.approx(60.8) and float(rows[0]["MME"]) == 1506


def test_make_table_options_and_errors(tmp_path, capsys):
    from dymu.lmms_eval.table import main

    _results(tmp_path / "a", {"POPE": 0.8, "GQA": 0.5}, "20250101_000000", tokens={"pope": [10, 20]})
    _results(tmp_path / "b", {"POPE": 0.4}, "20250101_000000", tokens={"pope": [5, 5]})
    assert main(["--run", f"ref={tmp_path / 'a'}", "--run", f"half={tmp_path / 'b'}", "--full", "ref"]) == 0
    out = capsys.readouterr().out
    assert "| half | 5 ± 0 | – | 40.0 | 50.0 |" in out and "| ref | 15 ± 5 | 50.0 | 80.0 | 100.0 |" in out
    assert main(["--run", f"x={tmp_path / 'nothing'}"]) == 2
    assert "no results at" in capsys.readouterr().err
    assert main(["--run", f"a={tmp_path / 'a'}", "--benchmark", "bad"]) == 2
    assert "LABEL=TASK:METRIC" in capsys.readouterr().err
