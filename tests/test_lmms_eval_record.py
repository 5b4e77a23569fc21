"""The lmms-eval token record without a model: its summary, and how it finds lmms-eval's results file of this
command (--output_path, --model, --model_args) once the process ends."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from dymu.lmms_eval import token_record
from dymu.lmms_eval.token_record import TokenRecord, lmms_eval_command, results_file_of, write_next_to_results_at_exit

ARGV = ["--model", "dymu_llava", "--model_args", "pretrained=/m,vtu=fast", "--tasks", "t", "--output_path", "out"]


def test_summary_by_task_with_sorted_samples():
    record = TokenRecord()
    record.add("b", "test", 1, [4])
    record.add("a", "test", 2, [3, 5])
    record.add("a", "test", 0, [9])
    record.add("a", "test", 0, [7])  # the same document again (a repeat): its last counts
    summary = record.summary("dymu_llava", {"vtu": "fast"}, 16)
    assert summary["model"] == "dymu_llava" and summary["full_tokens_per_image"] == 16
    assert [s["doc_id"] for s in summary["tasks"]["a"]["samples"]] == [0, 2]
    assert summary["tasks"]["a"]["samples"][0]["visual_tokens"] == [7]
    assert summary["tasks"]["a"]["mean"] == pytest.approx(5.0) and summary["tasks"]["a"]["images"] == 3
    assert summary["overall"]["images"] == 4 and summary["overall"]["mean"] == pytest.approx(19 / 4)
    assert record.gathered().samples == record.samples  # one process: its own samples


def test_command_line_is_read_only_under_lmms_eval(monkeypatch):
    monkeypatch.delitem(sys.modules, "lmms_eval.__main__", raising=False)
    assert lmms_eval_command(ARGV) is None  # not lmms-eval's command line (e.g. simple_evaluate from Python)
    monkeypatch.setitem(sys.modules, "lmms_eval.__main__", object())
    assert lmms_eval_command(ARGV) == {"output_path": "out", "model": "dymu_llava", "model_args": "pretrained=/m,vtu=fast"}
    assert lmms_eval_command(ARGV[:-2]) is None  # no --output_path: lmms-eval writes no results file either


def _results(folder, date, model_args, mtime):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{date}_results.json"
    path.write_text(json.dumps({"config": {"model": "dymu_llava", "model_args": model_args}}))
    os.utime(path, (mtime, mtime))
    return path


def test_the_record_follows_this_commands_results_file(tmp_path, monkeypatch):
    command = {"output_path": str(tmp_path), "model": "dymu_llava", "model_args": "pretrained=/m,vtu=fast"}
    now = time.time()
    older = _results(tmp_path / "m", "20260101_000000", "pretrained=/m,vtu=fast", now - 100)  # an earlier run
    ours = _results(tmp_path / "m", "20260101_000200", "pretrained=/m,vtu=fast", now)
    _results(tmp_path / "m", "20260101_000300", "pretrained=/m,vtu=exact", now + 5)  # another command, same folder
    assert results_file_of(command, since=now - 10) == ours
    assert results_file_of(command, since=now + 1) is None and older.exists()

    at_exit = []
    monkeypatch.setattr(token_record.atexit, "register", at_exit.append)
    summary = TokenRecord({"t": {("test", 0): [5]}}).summary("dymu_llava", {}, 16)
    write_next_to_results_at_exit(summary, command, since=now - 10)
    assert not (tmp_path / "m" / "20260101_000200_dymu_tokens.json").exists()  # nothing before the process ends
    (hook,) = at_exit
    hook()
    written = json.loads((tmp_path / "m" / "20260101_000200_dymu_tokens.json").read_text())
    assert written["tasks"]["t"]["samples"] == [{"split": "test", "doc_id": 0, "visual_tokens": [5]}]
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if "dymu_tokens" in p.name) == ["20260101_000200_dymu_tokens.json"]
