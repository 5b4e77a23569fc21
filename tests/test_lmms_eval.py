"""The lmms-eval plugin (--model dymu_llava): the real CLI end to end on a tiny random LLaVA and a tiny local task
(VTU fast, and VTU exact through eval_scripts/lmms_eval_llava15.sh), batching, clear errors, the eval scripts'
task names and metric keys. Skipped without the `eval` extra."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'dymu[eval]')")

from dymu.testing import save_tiny_llava, write_lmms_vqa_task  # noqa: E402
from dymu.thresholds import ThresholdCheckpoint, save_thresholds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LMMS_TASKS = Path(lmms_eval.__file__).parent / "tasks"

LL_YAML = """task: dymu_tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: loglikelihood
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: " w5 w6"
process_results: !function utils.ll_process_results
metric_list:
  - metric: logprob
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny LLaVA, thresholds (ours and another encoder's), a two-task local include path, offline HF settings."""
    root = tmp_path_factory.mktemp("lmms")
    llava = save_tiny_llava(root / "llava", image_size=56)
    thresholds = save_thresholds(root / "tiny.safetensors", ThresholdCheckpoint(torch.full((4,), 0.8), encoder="clip-56px-p14-d64"))
    siglip = save_thresholds(root / "siglip.safetensors", ThresholdCheckpoint(torch.zeros(4), encoder="siglip-so400m-patch14-384"))
    # flat, gradient, stripes, textured ... images: different token counts
    questions = [f"w{10 + i} w{20 + i}" for i in range(6)]
    tasks = write_lmms_vqa_task(root / "tasks", "dymu_tiny_vqa", questions, max_new_tokens=3)
    (tasks / "dymu_tiny_ll.yaml").write_text(LL_YAML)  # same questions, utils and images
    env = {"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    import datasets.config
    import huggingface_hub.constants

    # constants read at import time (another test module may have imported them already)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf" / "datasets", raising=False)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    yield {"root": root, "llava": llava, "thresholds": thresholds, "siglip": siglip, "tasks": tasks, "env": env}
    mp.undo()


def _cli(work, out, model_args, *, batch_size=2):
    return [sys.executable, "-m", "lmms_eval", "--model", "dymu_llava", "--model_args", model_args,
            "--tasks", "dymu_tiny_vqa,dymu_tiny_ll", "--include_path", str(work["tasks"]), "--batch_size", str(batch_size),
            "--device", "cpu", "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG"]


@pytest.fixture(scope="module")
def cli_runs(work):
    """Two real CLI runs side by side: VTU fast (python -m lmms_eval) and VTU exact (the LLaVA-1.5 eval script)."""
    env = {**os.environ, **work["env"]}
    fast_out = work["root"] / "fast"
    fast = subprocess.Popen(
        _cli(work, fast_out, f"pretrained={work['llava']},thresholds={work['thresholds']},vtu=fast"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work["root"],
    )
    script_out = work["root"] / "script"
    script_env = {
        **env, "MODEL": str(work["llava"]), "TASKS": "dymu_tiny_vqa", "SETTINGS": "low", "THR_LOW": str(work["thresholds"]),
        "VTU": "exact", "NUM_GPUS": "1", "BATCH_SIZE": "2", "PYTHON": sys.executable, "OUTPUT": str(script_out),
        "LMMS_ARGS": f"--include_path {work['tasks']} --device cpu --verbosity DEBUG",
        "TABLE_ARGS": "--benchmark Tiny=dymu_tiny_vqa:exact_match,none:100",
    }
    exact = subprocess.Popen(
        ["bash", str(ROOT / "eval_scripts" / "lmms_eval_llava15.sh")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=script_env, cwd=work["root"],
    )
    fast_log, _ = fast.communicate(timeout=600)
    exact_log, _ = exact.communicate(timeout=600)
    return {"fast": (fast.returncode, fast_log, fast_out), "exact": (exact.returncode, exact_log, script_out / "low")}


def _one(pattern):
    files = glob.glob(str(pattern))
    assert len(files) == 1, (pattern, files)
    return Path(files[0])


def _samples(path):
    return {s["doc_id"]: s for s in map(json.loads, Path(path).read_text().splitlines())}


def test_entry_point_registers_both_models():
    from lmms_eval.models import get_model, list_available_models

    names = list_available_models()
    assert "dymu_llava" in names and "dymu_llava_onevision" in names, (
        "dymu's lmms_eval.models entry point is not installed: reinstall dymu (pip install -e '.[eval]')"
    )
    assert get_model("dymu_llava").__name__ == "DyMULlava"


@pytest.mark.slow
def test_cli_vtu_fast_end_to_end(cli_runs):
    rc, log, out = cli_runs["fast"]
    assert rc == 0, log[-4000:]
    results_file = _one(out / "*" / "*_results.json")
    results = json.loads(results_file.read_text())
    assert "exact_match,none" in results["results"]["dymu_tiny_vqa"]
    assert results["results"]["dymu_tiny_ll"]["logprob,none"] < 0  # a summed log-probability
    # the token statistics are in the results file ...
    throughput = results["throughput"]
    assert throughput["avg_dymu_images"] == 12  # 6 documents x 2 tasks
    # ... and, per sample, in the record next to it (same date prefix)
    record = json.loads(results_file.with_name(results_file.name.replace("_results", "_dymu_tokens")).read_text())
    vqa = record["tasks"]["dymu_tiny_vqa"]
    counts = [s["visual_tokens"][0] for s in vqa["samples"]]
    assert [s["doc_id"] for s in vqa["samples"]] == list(range(6))
    assert len(set(counts)) > 1 and max(counts) <= 16 and min(counts) < 16  # merged, and per image
    assert vqa["mean"] == pytest.approx(sum(counts) / 6)
    assert record["tasks"]["dymu_tiny_ll"]["samples"] == vqa["samples"]  # the same images, the same counts
    assert throughput["avg_dymu_visual_tokens_mean"] == pytest.approx(record["overall"]["mean"])
    assert throughput["avg_dymu_visual_tokens_std"] == pytest.approx(record["overall"]["std"])
    assert record["settings"]["vtu"] == "fast" and record["settings"]["merging"] and record["full_tokens_per_image"] == 16
    # each logged sample carries the tokens its prompt put into the language model
    samples = _samples(_one(out / "*" / "*_samples_dymu_tiny_vqa.jsonl"))
    for doc_id, count in enumerate(counts):
        assert samples[doc_id]["token_counts"][0]["input_tokens"] == count + 2 + 2  # + "USER: w.. w.. ASSISTANT:"
    ll = _samples(_one(out / "*" / "*_samples_dymu_tiny_ll.jsonl"))
    assert all(isinstance(s["logprob"], float) and s["logprob"] < 0 for s in ll.values())


@pytest.mark.slow
def test_cli_vtu_exact_via_eval_script(cli_runs):
    rc, log, out = cli_runs["exact"]
    assert rc == 0, log[-4000:]
    assert "--model dymu_llava" in log and "vtu=exact" in log
    results_file = _one(out / "*" / "*_results.json")
    record = json.loads(results_file.with_name(results_file.name.replace("_results", "_dymu_tokens")).read_text())
    assert record["settings"]["vtu"] == "exact"
    # exact VTU gives the fast path's answers (greedy), with the same token counts
    fast_rc, _, fast_out = cli_runs["fast"]
    assert fast_rc == 0
    fast = _samples(_one(fast_out / "*" / "*_samples_dymu_tiny_vqa.jsonl"))
    exact = _samples(_one(out / "*" / "*_samples_dymu_tiny_vqa.jsonl"))
    assert {d: s["filtered_resps"] for d, s in exact.items()} == {d: s["filtered_resps"] for d, s in fast.items()}
    # the script ends with the table: this setting's row with its mean ± std tokens
    table = (out.parent / "table.md").read_text()
    overall = record["overall"]
    assert f"| low | {overall['mean']:.0f} ± {overall['std']:.0f} |" in table and "Tiny" in table


# ---------------------------------------------------------------------------------------------- in process
def _evaluate(work, model, tasks=("dymu_tiny_vqa", "dymu_tiny_ll"), model_args=""):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(work["tasks"]), include_defaults=False)
    return evaluator.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), device="cpu", task_manager=manager,
        log_samples=True, bootstrap_iters=0, verbosity="WARNING",
    )


def test_batch_of_two_equals_batch_of_one(work, monkeypatch, tmp_path):
    from dymu import evaluation
    from dymu.lmms_eval.llava import DyMULlava

    seen = []
    real = evaluation.generate

    def spy(model, processor, prompts, **kw):
        out = real(model, processor, prompts, **kw)
        seen.append([g.visual_tokens[0] for g in out])
        return out

    monkeypatch.setattr(evaluation, "generate", spy)
    runs = {}
    for bs in (1, 2):
        lm = DyMULlava(pretrained=str(work["llava"]), thresholds=str(work["thresholds"]), batch_size=bs, device="cpu",
                       tokens_path=str(tmp_path / f"tokens{bs}.json"))
        seen.clear()
        results = _evaluate(work, lm)
        runs[bs] = (results, json.loads((tmp_path / f"tokens{bs}.json").read_text()), list(seen))
    one, two = runs[1], runs[2]
    assert all(len(b) == 1 for b in one[2])
    assert len(two[2]) == 3 and any(len(b) == 2 and b[0] != b[1] for b in two[2])  # different counts, one forward
    for task in ("dymu_tiny_vqa", "dymu_tiny_ll"):
        a = {s["doc_id"]: s for s in one[0]["samples"][task]}
        b = {s["doc_id"]: s for s in two[0]["samples"][task]}
        assert sorted(a) == sorted(b) == list(range(6))
        for d in a:
            if task == "dymu_tiny_vqa":
                assert a[d]["filtered_resps"] == b[d]["filtered_resps"]
            else:
                assert a[d]["logprob"] == pytest.approx(b[d]["logprob"], abs=1e-4)
    assert one[1]["tasks"] == two[1]["tasks"]


def test_construction_errors_are_clear(work):
    with pytest.raises(FileNotFoundError, match="dymu_llava: checkpoint not found") as err:
        _evaluate(work, "dymu_llava", model_args=f"pretrained={work['root'] / 'missing'}")
    assert "dymu" in str(err.traceback[-1].path)  # raised by dymu's own check, not deep inside lmms-eval
    with pytest.raises(ValueError, match="are for encoder 'siglip-so400m-patch14-384'") as err:
        _evaluate(work, "dymu_llava", model_args=f"pretrained={work['llava']},thresholds={work['siglip']}")
    assert str(err.traceback[-1].path).endswith(os.path.join("dymu", "lmms_eval", "llava.py"))
    # a DyMU name for another encoder: its checkpoint is missing here, or it is refused for this tower
    with pytest.raises((FileNotFoundError, ValueError), match="no thresholds for ViT-L-14-336-tome-72out|encoder 'ViT-L-14-336'"):
        _evaluate(work, "dymu_llava", model_args=f"pretrained={work['llava']},thresholds=ViT-L-14-336-tome-72out")
    with pytest.raises(ValueError, match=r"unknown model_args \['threshold'\]"):
        _evaluate(work, "dymu_llava", model_args=f"pretrained={work['llava']},threshold=0.5")
    # the OneVision backend given a LLaVA-1.5 folder names the backend to use
    with pytest.raises(ValueError, match="dymu_llava_onevision: cannot load .* for LLaVA-1.5 use --model dymu_llava"):
        _evaluate(work, "dymu_llava_onevision", model_args=f"pretrained={work['llava']}")


def test_cli_logs_the_error_and_writes_no_results(work, monkeypatch, capsys):
    """The CLI catches a failed evaluation, logs it and exits 0: the message must be dymu's, and no results."""
    from lmms_eval.__main__ import cli_evaluate

    out = work["root"] / "missing-out"
    argv = _cli(work, out, f"pretrained={work['root'] / 'missing'}")[3:]
    argv[argv.index("DEBUG")] = "INFO"
    monkeypatch.setattr(sys, "argv", ["lmms_eval", *argv])
    cli_evaluate()
    captured = capsys.readouterr()
    assert "Error during evaluation: dymu_llava: checkpoint not found" in captured.out + captured.err
    assert not glob.glob(str(out / "**" / "*_results.json"), recursive=True)


def test_failed_construction_is_loud_and_paths_resolve_from_the_start_folder(work, monkeypatch, capsys, tmp_path):
    """A relative thresholds= path run from another folder: lmms-eval still exits 0 (documented in
    docs/easy_vqa_task.md), but the plugin frames the error on stderr naming the absolute path it tried; from the
    right folder, paths are made absolute at construction."""
    from lmms_eval.__main__ import cli_evaluate

    from dymu.lmms_eval.llava import DyMULlava

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out"
    argv = _cli(work, out, f"pretrained={work['llava']},thresholds={work['thresholds'].name}")[3:]
    argv[argv.index("DEBUG")] = "INFO"
    monkeypatch.setattr(sys, "argv", ["lmms_eval", *argv])
    capsys.readouterr()
    cli_evaluate()  # returns normally: the process would exit with status 0
    err = capsys.readouterr().err
    assert "dymu_llava: THE MODEL COULD NOT BE BUILT - nothing is evaluated" in err, err
    assert f"threshold checkpoint not found: {elsewhere / work['thresholds'].name}" in err, err
    assert "exits with status 0" in err
    assert not glob.glob(str(out / "**" / "*_results.json"), recursive=True)

    monkeypatch.chdir(work["root"])
    model = DyMULlava(pretrained=str(work["llava"]), thresholds=work["thresholds"].name, tokens_path="t.json", device="cpu")
    assert model.settings["thresholds"] == str(work["thresholds"])
    assert model.tokens_path == work["root"] / "t.json"


# ---------------------------------------------------------------------------------------------- scripts on paper
def _yaml_tasks() -> dict[str, str]:
    """Task name -> YAML text of every task shipped with the installed lmms-eval."""
    found = {}
    for path in LMMS_TASKS.rglob("*.yaml"):
        text = path.read_text(errors="replace")
        m = re.search(r'^task:\s*"?([\w\-.]+)"?\s*$', text, re.M)
        if m:
            found[m.group(1)] = text
    return found


def test_eval_scripts_name_real_tasks_and_metrics():
    from dymu.lmms_eval.table import BENCHMARKS

    tasks = _yaml_tasks()
    script = (ROOT / "eval_scripts" / "lmms_eval_llava15.sh").read_text()
    default = re.search(r"^TASKS=\$\{TASKS:-([^}]+)\}", script, re.M).group(1).split(",")
    assert default == [b.task for b in BENCHMARKS]
    for b in BENCHMARKS:
        assert b.task in tasks, f"{b.task} is not an lmms-eval {lmms_eval.__name__} task"
        metric = b.metric.split(",")[0]
        assert re.search(rf"-\s*metric:\s*{metric}\s*$", tasks[b.task], re.M), f"{b.task} has no metric {metric}"
    dry = subprocess.run(["bash", str(ROOT / "eval_scripts" / "lmms_eval_llava15.sh")], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "NUM_GPUS": "4"}, check=True).stdout
    runs = [line for line in dry.splitlines() if "-m lmms_eval" in line]
    assert len(runs) == 4 and all(r.startswith("+ accelerate launch --num_processes=4") for r in runs)
    assert "dymu=false" in runs[0]
    for run, k in zip(runs[1:], (72, 192, 384)):
        assert f"thresholds=ViT-L-14-336-tome-{k}out,vtu=fast" in run
    ov = subprocess.run(["bash", str(ROOT / "eval_scripts" / "lmms_eval_llava_onevision.sh")], capture_output=True,
                        text=True, env={**os.environ, "DRY_RUN": "1", "NUM_GPUS": "1"}, check=True).stdout
    assert ov.count("--model dymu_llava_onevision") == 4


def test_backend_methods_directly(work):
    """The three lmms methods on hand-made requests: the stock baseline (full counts), a token budget, the
    ``loss`` sign for multiple-choice scoring, and multi-round generation."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from dymu.lmms_eval.llava import DyMULlava

    docs = [{"image": str(work["tasks"] / "images" / f"{i}.png"), "q": f"w{10 + i}"} for i in range(4)]

    def visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    def next_round(doc, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx == 2:
            return None, None, True, previous_output, None
        return visual(doc), "w40 " + previous_output[-1], False, previous_output, {"round": round_idx}

    def req(kind, args):
        return Instance(kind, args, 0, metadata={"task": args[-2], "doc_id": args[-3], "repeats": 1})

    out = {}
    for name, kw in {"stock": {"dymu": False}, "budget": {"thresholds": str(work["thresholds"]), "token_budget": 6,
                                                          "loglikelihood_output": "loss"}}.items():
        lm = DyMULlava(pretrained=str(work["llava"]), device="cpu", batch_size=2, **kw)
        lm.task_dict = {"t": {"test": docs}, "mr": {"test": docs}}
        gen = lm.generate_until([req("generate_until", (d["q"], {"max_new_tokens": 2}, visual, i, "t", "test")) for i, d in enumerate(docs)])
        ll = lm.loglikelihood([req("loglikelihood", (d["q"], " w5", visual, i, "t", "test")) for i, d in enumerate(docs)])
        rounds = lm.generate_until_multi_round(
            [req("generate_until_multi_round", (d["q"], {"max_new_tokens": 2}, visual, next_round, i, "mr", "test")) for i, d in enumerate(docs[:2])]
        )
        out[name] = (gen, ll, rounds, lm.token_record())
    gen, ll, rounds, record = out["stock"]
    assert all(isinstance(g.text, str) for g in gen) and all(lp < 0 and isinstance(g, bool) for lp, g in ll)
    assert record["overall"] == {"images": 8, "mean": 16.0, "std": 0.0, "min": 16, "max": 16}  # full count
    assert [len(r) for r in rounds] == [2, 2] and rounds[0][0] == gen[0].text  # round 0 answers the context
    assert [s["visual_tokens"] for s in record["tasks"]["mr"]["samples"]] == [[16, 16], [16, 16]]
    _, ll_loss, _, record = out["budget"]
    assert all(v > 0 for v, _ in ll_loss)  # "loss": the negated log-probability
    assert record["tasks"]["t"]["mean"] == pytest.approx(6, abs=1.5)  # the calibrated budget
    assert record["settings"]["token_order"] == "single" and record["settings"]["threshold_offset"] != 0


def test_plugin_appends_the_checkpoints_prompt_suffix(work, tmp_path, monkeypatch):
    """Each request's text gets the checkpoint's own prompt suffix (its config's "dymu" block); the model_arg wins
    (a written backslash-n is a newline); a checkpoint that records none gets nothing (its tasks' instructions)."""
    import shutil

    from lmms_eval.api.instance import Instance
    from PIL import Image

    from dymu import evaluation
    from dymu.lmms_eval.llava import DyMULlava

    model_dir = tmp_path / "model"
    shutil.copytree(work["llava"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dymu": {"prompt_suffix": " w7"}}))
    seen: list[str] = []
    real_generate, real_ll = evaluation.generate, evaluation.loglikelihood
    monkeypatch.setattr(evaluation, "generate", lambda m, p, prompts, **kw: (seen.extend(x.text for x in prompts), real_generate(m, p, prompts, **kw))[1])
    monkeypatch.setattr(evaluation, "loglikelihood", lambda m, p, prompts, c: (seen.extend(x.text for x in prompts), real_ll(m, p, prompts, c))[1])
    docs = [{"image": str(work["tasks"] / "images" / "0.png")}]

    def visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    def req(kind, args):
        return Instance(kind, args, 0, metadata={"task": "t", "doc_id": 0, "repeats": 1})

    expected = {(model_dir, None): " w7", (model_dir, ""): "", (model_dir, "\\nw8"): "\nw8", (work["llava"], None): ""}
    for (path, given), suffix in expected.items():
        seen.clear()
        lm = DyMULlava(pretrained=str(path), device="cpu", **({} if given is None else {"prompt_suffix": given}))
        lm.task_dict = {"t": {"test": docs}}
        lm.generate_until([req("generate_until", ("w10", {"max_new_tokens": 1}, visual, 0, "t", "test"))])
        lm.loglikelihood([req("loglikelihood", ("w11", " w5", visual, 0, "t", "test"))])
        assert seen == ["w10" + suffix, "w11" + suffix], (path, given)
        assert lm.settings["prompt_suffix"] == suffix and lm.token_record()["overall"]["mean"] == 16.0  # DyMU off


@pytest.mark.slow
def test_cli_method_prune_end_to_end(work):
    """``--model_args method=prune,token_budget=K`` through the real CLI: every image keeps exactly K patches (CLS
    attention), the record says so, and the language model read K visual tokens per prompt."""
    out = work["root"] / "prune"
    cmd = _cli(work, out, f"pretrained={work['llava']},method=prune,token_budget=5")
    cmd[cmd.index("--tasks") + 1] = "dymu_tiny_vqa"
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **work["env"]}, cwd=work["root"],
                         timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    results_file = _one(out / "*" / "*_results.json")
    record = json.loads(results_file.with_name(results_file.name.replace("_results", "_dymu_tokens")).read_text())
    counts = [s["visual_tokens"] for s in record["tasks"]["dymu_tiny_vqa"]["samples"]]
    assert counts == [[5]] * 6
    assert record["settings"]["method"] == "prune" and record["settings"]["vtu"] == "off"
    assert record["settings"]["merging"] and record["full_tokens_per_image"] == 16
    samples = _samples(_one(out / "*" / "*_samples_dymu_tiny_vqa.jsonl"))
    assert all(s["token_counts"][0]["input_tokens"] == 5 + 2 + 2 for s in samples.values())
