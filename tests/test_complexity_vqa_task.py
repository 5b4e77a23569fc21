"""dymu's lmms-eval task ``dymu_complexity_vqa`` (src/dymu/lmms_eval/tasks/complexity_vqa/): its documents and
per-level metrics without a model, and one run through the real ``python -m lmms_eval`` CLI with ``--model
dymu_llava`` on the real small VLM (committed projector, merging off), the first 8 questions.

The CLI test is marked ``real`` and ``slow`` and skipped (with the reason) without lmms-eval or the real weights.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_easyvqa_task import _has, _weights_reason

LIMIT = 8


def test_documents_and_level_metrics():
    from dymu.complexity_vqa import generate
    from dymu.lmms_eval.tasks.complexity_vqa import utils

    docs = utils.rows(seed=3, count=20)
    items = generate(3, 20)
    assert [(d["question"], d["answer"], d["level"]) for d in docs] == [
        (it.questions[0].question, it.questions[0].answer, it.level) for it in items]
    assert docs[0]["image"].tobytes() == items[0].image.tobytes()
    assert utils.doc_to_text(docs[0]) == docs[0]["question"]
    doc = {"answer": "teal", "level": 2}
    out = utils.process_results(doc, [" Teal."])
    assert out["exact_match"] == 1.0 and out["level_2"] == (2, 1.0)
    assert utils.process_results(doc, ["blue"])["exact_match"] == 0.0
    pairs = [(0, 1.0), (2, 0.0), (2, 1.0), (3, 0.0), (2, 1.0)]
    assert utils.level_0(pairs) == 1.0 and utils.level_2(pairs) == pytest.approx(2 / 3) and utils.level_3(pairs) == 0.0
    assert math.isnan(utils.level_1(pairs))


def test_task_is_indexed_by_lmms_eval():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'dymu[eval]')")
    from lmms_eval.tasks import TaskManager

    from dymu.lmms_eval.tasks import include_path

    manager = TaskManager("WARNING", include_path=include_path(), include_defaults=False)
    assert "dymu_complexity_vqa" in manager.all_tasks


@pytest.mark.real
@pytest.mark.slow
def test_cli_complexity_vqa(tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'dymu[eval]')")
    if not _has("easy_vqa"):
        pytest.skip("easy-vqa is not installed (pip install 'dymu[real]')")
    reason = _weights_reason()
    if reason:
        pytest.skip(reason)
    from dymu.lmms_eval.tasks import include_path
    from dymu.lmms_eval.tasks.complexity_vqa.utils import rows
    from dymu.lmms_eval.tasks.easy_vqa.utils import normalise
    from dymu.small_vlm import build_small_vlm

    model, processor = build_small_vlm("default")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    del model
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "dymu_llava", "--model_args",
           f"pretrained={tmp_path / 'model'},dymu=false", "--tasks", "dymu_complexity_vqa", "--limit", str(LIMIT),
           "--include_path", include_path(), "--batch_size", str(LIMIT), "--device", "cpu", "--output_path", str(out),
           "--log_samples"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = glob.glob(str(out / "*" / "*_results.json"))
    assert len(files) == 1, (files, run.stderr[-3000:])
    results = json.loads(Path(files[0]).read_text())
    task = results["results"]["dymu_complexity_vqa"]
    assert results["n-samples"]["dymu_complexity_vqa"] == {"original": 1040, "effective": LIMIT}
    samples = [json.loads(line) for line in
               Path(glob.glob(str(out / "*" / "*_samples_dymu_complexity_vqa.jsonl"))[0]).read_text().splitlines()]
    docs = rows()[:LIMIT]
    assert sorted(s["doc_id"] for s in samples) == list(range(LIMIT))
    for s in samples:
        doc = docs[s["doc_id"]]
        assert s["target"] == doc["answer"] and s["input"] == doc["question"]
        pred = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        assert isinstance(pred, str) and pred.strip(), s
        assert s["exact_match"] == float(normalise(pred) == normalise(doc["answer"]))
    assert task["exact_match,none"] == pytest.approx(sum(s["exact_match"] for s in samples) / LIMIT)
    for k in range(4):  # each level's accuracy over that level's questions only
        mine = [s["exact_match"] for s in samples if docs[s["doc_id"]]["level"] == k]
        value = task.get(f"level_{k},none")
        if mine:
            assert value == pytest.approx(sum(mine) / len(mine)), (k, value, mine)
        else:  # no question of that level among the first 8: no number
            assert not isinstance(value, (int, float)) or math.isnan(value), (k, value)
