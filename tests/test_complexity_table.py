"""The complexity-VQA table (dymu.evaluation.complexity_rows / complexity_report, eval_scripts/complexity_vqa_table.py):
McNemar's exact test, accuracy and tokens per level, the mix model's threshold sets by name, the resumable row
runner on a tiny random LLaVA with generated complexity questions, and the tables rendered from a results file."""

from __future__ import annotations

import csv
import json
import math
import runpy
import sys
from pathlib import Path

import pytest

import dymu.small_vlm as small_vlm
import dymu.small_vlm.model as small_vlm_model
from dymu.evaluation import ensure_chat_template
from dymu.evaluation.complexity_report import markdown_tables, write_csv
from dymu.evaluation.complexity_rows import new_results, paired_tests, pending, question_rows, run_rows
from dymu.evaluation.easy_vqa_rows import Row
from dymu.evaluation.stats import grouped_accuracy, mcnemar, wilson
from dymu.testing import find_and_save_thresholds, tiny_llava

ROOT = Path(__file__).resolve().parents[1]


def _pairs(b: int, c: int, both: int = 2, neither: int = 1) -> tuple[list[bool], list[bool]]:
    first = [True] * b + [False] * c + [True] * both + [False] * neither
    second = [False] * b + [True] * c + [True] * both + [False] * neither
    return first, second


@pytest.mark.parametrize("b, c, p", [(0, 0, 1.0), (3, 3, 1.0), (1, 5, 2 * 7 / 64), (6, 0, 2 / 64),
                                     (10, 2, 2 * (1 + 12 + 66) / 4096), (4, 5, 1.0)])
def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_binomial_p(b, c, p):
    """Hand values: p = 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1; concordant pairs do not count."""
    result = mcnemar(*_pairs(b, c))
    assert (result["b"], result["c"], result["n"]) == (b, c, b + c)
    assert result["p"] == pytest.approx(p, rel=1e-12)
    assert mcnemar(*_pairs(c, b))["p"] == pytest.approx(p, rel=1e-12)  # symmetric in the two methods
    with pytest.raises(ValueError, match="pair the same questions"):
        mcnemar([True], [True, False])


def test_mcnemar_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(7, 19), (30, 12), (0, 9), (50, 50), (1, 40)]:
        assert mcnemar(*_pairs(b, c))["p"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_grouped_accuracy_per_level():
    correct = [True, False, True, True, False, True]
    tokens = [10, 20, 30, 30, 40, 50]
    levels = [1, 0, 1, 3, 3, 3]
    out = grouped_accuracy(correct, tokens, levels)
    assert list(out) == ["0", "1", "3"]
    assert {k: (v["n"], v["correct"]) for k, v in out.items()} == {"0": (1, 0), "1": (2, 2), "3": (3, 2)}
    assert out["3"]["accuracy"] == pytest.approx(2 / 3) and out["3"]["wilson95"] == list(wilson(2, 3))
    assert out["3"]["tokens_mean"] == pytest.approx(40.0)
    assert out["3"]["tokens_std"] == pytest.approx(math.sqrt(200 / 3))  # population std of 30, 40, 50
    assert (out["1"]["tokens_mean"], out["1"]["tokens_std"]) == (20.0, 10.0)


def test_mix_threshold_sets_resolve_by_name_inside_the_package():
    mix = small_vlm.threshold_path("mix-28out")
    assert mix == small_vlm.threshold_path("mix-dinov2-small-224-tome-28out")
    assert mix.parent == small_vlm.MIX_THRESHOLD_DIR and mix.is_relative_to(Path(small_vlm.CHECKPOINT_DIR).parent)
    assert mix.read_bytes() != small_vlm.threshold_path("28out").read_bytes()  # not the easy-VQA model's set
    assert (ROOT / "checkpoints/small_vlm_mix/thresholds/dinov2-small-224-tome-28out.safetensors").resolve() == mix
    assert {f"mix-dinov2-small-224-tome-{k}out" for k in (28, 88, 176)} <= set(small_vlm.threshold_sets())
    with pytest.raises(FileNotFoundError, match=r"no threshold set 'mix-29out'; shipped sets: mix-dinov2-small-224-tome-"
                                                r"176out, mix-dinov2-small-224-tome-28out, mix-dinov2-small-224-tome-88out$"):
        small_vlm.threshold_path("mix-29out")
    with pytest.raises(FileNotFoundError, match=r"'mix-28out-raster'"):
        small_vlm.threshold_path("mix-28out-raster")
    row = Row("dymu-88-fast", {}, sets="mix-")
    assert row.info(ROOT)["thresholds"] == "src/dymu/small_vlm_mix_checkpoint/thresholds/dinov2-small-224-tome-88out.safetensors"
    with pytest.raises(ValueError, match="dymu-99-fast: no thresholds .*'mix-99out'"):
        Row("dymu-99-fast", {}, sets="mix-")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LLaVA (16 visual tokens per image), 3 generated complexity questions, and thresholds for its
    tower (8 merges) shipped as the mix set "8out" in a stand-in package folder."""
    model, processor = tiny_llava(image_size=56)
    ensure_chat_template(processor)
    rows = question_rows(seed=1, count=3)
    calib = question_rows(seed=5, count=8)
    pixels = processor.image_processor([r["image"] for r in calib], return_tensors="pt").pixel_values
    folder = tmp_path_factory.mktemp("mix_thresholds")
    find_and_save_thresholds(model.model.vision_tower, pixels, 8, folder / "dinov2-small-224-tome-8out.safetensors")
    return model.eval(), processor, rows, folder


LABELS = ["full", "dymu-8-fast", "tome@8-fast", "prune@8", "random@8"]


def test_runner_records_per_level_answers_and_resumes(tiny, tmp_path, monkeypatch):
    model, processor, rows, folder = tiny
    monkeypatch.setattr(small_vlm_model, "MIX_THRESHOLD_DIR", folder)  # where threshold_path looks
    levels = [r["level"] for r in rows]
    assert len(rows) == 3 and len(set(levels)) > 1  # the test needs questions of several levels
    out = tmp_path / "r.json"
    results = new_results(rows, 1, 3, "p.safetensors")
    assert results["subset"]["per_level"] == {str(v): levels.count(v) for v in set(levels)}
    done = run_rows(model, processor, rows, LABELS, results, out, batch=2, command=lambda x: f"run {x}")
    assert done == LABELS and json.loads(out.read_text()) == results
    by = {r["row"]: r for r in results["rows"]}
    for label, entry in by.items():
        preds = entry["predictions"]
        assert [(p["index"], p["level"], p["qtype"]) for p in preds] == [(r["index"], r["level"], r["qtype"]) for r in rows]
        assert entry["command"] == f"run {label}" and entry["complete"]
        for level, stats in entry["per_level"].items():
            mine = [p for p in preds if str(p["level"]) == level]
            assert stats["n"] == len(mine) == levels.count(int(level))
            assert stats["correct"] == sum(p["correct"] for p in mine)
            assert stats["tokens_mean"] == pytest.approx(sum(p["tokens"] for p in mine) / len(mine))
    assert [p["tokens"] for p in by["full"]["predictions"]] == [16, 16, 16]
    dymu_tokens = [p["tokens"] for p in by["dymu-8-fast"]["predictions"]]
    assert all(t < 16 for t in dymu_tokens)
    budget = round(sum(dymu_tokens) / 3)
    for label in ("tome@8-fast", "prune@8", "random@8"):  # the fixed-count rows keep DyMU's mean on every image
        assert [p["tokens"] for p in by[label]["predictions"]] == [budget] * 3 and by[label]["tokens_per_image"] == budget

    # resuming: finished rows are skipped; a missing or unfinished row is run again
    assert run_rows(model, processor, rows, LABELS, results, out) == [] and pending(results, LABELS) == []
    results["rows"] = [r for r in results["rows"] if r["row"] != "prune@8"]
    by["random@8"]["complete"] = False
    assert pending(results, LABELS) == ["prune@8", "random@8"]
    again = json.loads(json.dumps(results))
    assert run_rows(model, processor, rows, LABELS, again, out) == ["prune@8", "random@8"]
    assert [r["row"] for r in json.loads(out.read_text())["rows"]] == ["full", "dymu-8-fast", "tome@8-fast", "prune@8",
                                                                       "random@8"]


def _entry(label: str, right: list[bool], levels: list[int], tokens: list[int], **extra) -> dict:
    preds = [{"index": i, "pred": "x", "answer": "x", "level": lv, "qtype": "color", "tokens": t, "correct": ok}
             for i, (ok, lv, t) in enumerate(zip(right, levels, tokens))]
    return {"row": label, "n": len(right), "correct": sum(right), "accuracy": sum(right) / len(right),
            "wilson95": list(wilson(sum(right), len(right))), "visual_tokens_mean": sum(tokens) / len(tokens),
            "visual_tokens_std": 0.0, "complete": True, "per_class": {}, "predictions": preds,
            "per_level": grouped_accuracy(right, tokens, levels), "command": f"run {label}", **extra}


def test_tables_and_paired_tests_from_a_results_file(tmp_path, monkeypatch):
    levels = [0, 0, 0, 0, 1, 1, 1, 1]
    results = {"subset": {"n": 8, "seed": 1, "count": 8, "per_level": {"0": 4, "1": 4}}, "rows": [
        _entry("full", [True] * 8, levels, [16] * 8, kind="full"),
        _entry("dymu-28-fast", [True, True, False, True, True, True, True, False], levels, [4, 4, 6, 6, 10, 12, 10, 12],
               kind="dymu", vtu="fast"),
        _entry("tome@28-fast", [True, False, True, False, False, False, True, False], levels, [8] * 8, kind="tome",
               vtu="fast", tokens_per_image=8),
    ]}
    tests = {t["level"]: t for t in paired_tests(results)}
    assert [(t["b"], t["c"], t["questions"]) for t in tests.values()] == [(4, 1, 8), (2, 1, 4), (2, 0, 4)]
    assert [t["p"] for t in tests.values()] == pytest.approx([2 * 6 / 32, 1.0, 2 / 4])
    assert (tests["all"]["dymu_correct"], tests["all"]["tome_correct"]) == (6, 3)

    md = markdown_tables(results)
    assert "| DyMU-low (28out), VTU fast | `dymu-28-fast` | 8.0 ± 3.2 | 6/8 = **75.0 [40.9, 92.9]** | 75.0 | " \
           "75.0 [30.1, 95.4] | 75.0 [30.1, 95.4] |" in md
    assert "| `dymu-28-fast` | 5.0 ± 1.0 | 11.0 ± 1.0 |" in md and "| `tome@28-fast` | 8.0 ± 0.0 | 8.0 ± 0.0 |" in md
    assert "| `dymu-28-fast` vs `tome@28-fast` | all | 8 | 6 | 3 | 4 | 1 | 0.375 |" in md
    assert "* `prune@28`" not in md and "* `tome@28-fast`: `run tome@28-fast`" in md
    write_csv(results, tmp_path / "t.csv")
    table = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [(r["row"], r["level"], r["n"]) for r in table[3:6]] == [("dymu-28-fast", "all", "8"), ("dymu-28-fast", "0", "4"),
                                                                 ("dymu-28-fast", "1", "4")]
    assert (table[8]["accuracy"], table[8]["pct_of_full"], table[8]["visual_tokens_mean"]) == ("0.25", "25.0", "8.0")

    # the script re-renders the same tables from the file, without a model
    (tmp_path / "r.json").write_text(json.dumps(results))
    argv = ["complexity_vqa_table.py", "--rows", "", "--out", str(tmp_path / "r.json"), "--markdown",
            str(tmp_path / "s.md"), "--csv", str(tmp_path / "s.csv")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "eval_scripts" / "complexity_vqa_table.py"), run_name="__main__")
    assert done.value.code == 0
    assert (tmp_path / "s.md").read_text() == md
    assert (tmp_path / "s.csv").read_bytes() == (tmp_path / "t.csv").read_bytes()
