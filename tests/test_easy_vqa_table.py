"""The small VLM's easy-VQA table in the library (dymu.evaluation.easy_vqa_rows / easy_vqa_report): row labels,
the row runner on a tiny random LLaVA (3 questions), the results file, the CSV/markdown writers and the script's
re-render, and the Wilson interval."""

from __future__ import annotations

import csv
import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from dymu.evaluation import ensure_chat_template, wilson
from dymu.evaluation.easy_vqa_report import markdown_tables, row_name, write_csv
from dymu.evaluation.easy_vqa_rows import Row, answer_batch, dymu_means, evaluate_row, put_row
from dymu.samples import make_image
from dymu.testing import tiny_llava

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (211, 260), (10, 10)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Each bound p solves (k/n - p)^2 = z^2 p (1 - p) / n, the Wilson score interval's definition."""
    z = 1.959964
    lo, hi = wilson(k, n)
    assert 0 <= lo <= k / n + 1e-12 and k / n <= hi + 1e-12 and hi <= 1
    for p in (lo, hi):
        assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, abs=1e-12)
    assert wilson(0, 0) == (0.0, 1.0)


def test_row_labels():
    means = {88: 85.8, 28: 27.1}
    assert (Row("full", {}).kind, Row("full", {}).count) == ("full", 256)
    dymu = Row("dymu-88-raster-exact", {})
    assert (dymu.kind, dymu.k, dymu.raster, dymu.vtu) == ("dymu", 88, True, "exact")
    assert dymu.info()["token_order"] == "raster" and dymu.info()["thresholds"].endswith("tome-88out-raster.safetensors")
    tome = Row("tome@88-fast", means)
    assert (tome.kind, tome.k, tome.vtu, tome.count) == ("tome", 88, "fast", 86)
    assert tome.info() == {"kind": "tome", "vtu": "fast", "matched_to": "dymu-88-fast", "tokens_per_image": 86}
    assert (Row("prune@28", means).count, Row("random@28", means).vtu) == (27, None)
    for bad, message in [("tome@88", "unknown row"), ("prune@88-fast", "unknown row"), ("dymu-88", "unknown row"),
                         ("random@176", "run dymu-176-fast first"), ("dymu-99-fast", "no thresholds")]:
        with pytest.raises(ValueError, match=message):
            Row(bad, means)
    assert row_name("dymu-88-raster-fast") == "DyMU-mid (88out, raster), VTU fast"
    assert row_name("prune@28") == "CLS-attention pruning @ DyMU-low"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, processor = tiny_llava(image_size=56)
    ensure_chat_template(processor)
    folder = tmp_path_factory.mktemp("easyvqa")
    rows = []
    for i, kind in enumerate(["flat", "textured", "stripes"]):
        make_image(kind, 64, i).save(folder / f"{i}.png")
        rows.append({"index": 40 + i, "question": f"w{3 + i} w7", "answer": "w9", "image": str(folder / f"{i}.png")})
    return model.eval(), processor, rows


def test_row_runner_scores_and_counts(tiny):
    """A random-drop row keeps its budget, is seeded per question (the same answers in any batch), and scores
    answers after normalisation."""
    model, processor, rows = tiny
    row = Row("random@5", {5: 4.6})
    assert row.inputs(model, processor, rows)["selection_seeds"] == [40, 41, 42]
    assert "selection_seeds" not in Row("full", {}).inputs(model, processor, rows)
    row.enable(model)
    try:
        preds, counts = answer_batch(model, processor, rows, row=row)
        alone = [answer_batch(model, processor, [r], row=row)[0][0] for r in rows]
        rows = [dict(rows[0], answer=preds[0].upper() + "."), *rows[1:]]  # right after normalisation only
        result = evaluate_row(model, processor, rows, 2, "random@5", row=row)
    finally:
        row.disable(model)
    assert counts == [5, 5, 5] and preds == alone
    assert [p["pred"] for p in result["predictions"]] == preds and result["complete"] and result["n"] == 3
    correct = 1 + sum(p.strip().lower() == "w9" for p in preds[1:])
    assert result["correct"] == correct and result["accuracy"] == correct / 3
    assert result["wilson95"] == list(wilson(correct, 3))
    assert (result["visual_tokens_mean"], result["visual_tokens_std"]) == (5.0, 0.0)
    assert sum(v[1] for v in result["per_class"].values()) == 3


def _entry(label, correct, preds, complete=True, mean=256.0, **extra):
    n = len(preds)
    return {"row": label, "n": n, "correct": correct, "accuracy": correct / n, "wilson95": list(wilson(correct, n)),
            "visual_tokens_mean": mean, "visual_tokens_std": 0.0, "complete": complete,
            "per_class": {"yes": [correct, n]}, "predictions": [{"pred": p} for p in preds], **extra}


def test_results_file_and_tables(tmp_path, monkeypatch, capsys):
    results = {"subset": {"n": 4}, "threads": 1, "rows": [_entry("full", 4, ["yes", "no", "red", "blue"])]}
    put_row(results, _entry("dymu-28-fast", 3, ["Yes.", "no", "green", "x"], mean=27.4, prefill_ratio=2.5))
    put_row(results, _entry("dymu-88-fast", 2, ["y", "n", "r", "b"], complete=False, mean=80.0))
    assert results["rows"][1]["same_answer_as_full"] == 2  # "Yes." equals "yes" after normalisation
    assert dymu_means(results) == {28: 27.4}  # the incomplete row gives no mean
    put_row(results, _entry("dymu-28-fast", 1, ["yes", "no", "red", "x"], mean=27.4, prefill_ratio=2.5))
    assert [r["row"] for r in results["rows"]] == ["full", "dymu-88-fast", "dymu-28-fast"]
    assert results["rows"][2]["same_answer_as_full"] == 3

    md = markdown_tables(results).splitlines()
    assert md[4].startswith("| DyMU-low (28out), VTU fast | `dymu-28-fast` | 27.4 ± 0.0 | 1/4 = **25.0 %** |")
    assert md[4].endswith("| 25.0 | 3/4 | 2.50× |") and md[2].endswith("| 100.0 | — | 1 (ref.) |")
    write_csv(results, tmp_path / "t.csv")
    table = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [r["pct_of_full"] for r in table] == ["100.0", "50.0", "25.0"]
    assert table[2]["wilson95_low"] == str(round(wilson(1, 4)[0], 4)) and table[1]["same_answer_as_full"] == "0"

    # the script re-renders the same tables from the file, without loading a model
    (tmp_path / "r.json").write_text(json.dumps(results))
    argv = ["small_vlm_easyvqa.py", "--rows", "", "--out", str(tmp_path / "r.json"),
            "--markdown", str(tmp_path / "s.md"), "--csv", str(tmp_path / "s.csv")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "eval_scripts" / "small_vlm_easyvqa.py"), run_name="__main__")
    assert done.value.code == 0
    assert (tmp_path / "s.md").read_text() == "\n".join(md) + "\n"
    assert (tmp_path / "s.csv").read_bytes() == (tmp_path / "t.csv").read_bytes()
    assert math.isclose(json.loads((tmp_path / "r.json").read_text())["rows"][2]["accuracy"], 0.25)
