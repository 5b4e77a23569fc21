"""Shared helpers of the benchmark scripts: timing, peak memory, targets, tables.

Timing: :func:`interleaved` runs every configuration once per round, ``warmup`` untimed rounds then
``repeats`` timed ones, and reports medians (the benchmarks compare configurations this way, so a shared
machine's drift hits all alike); :func:`median_time` times one function alone. On CUDA each run is bracketed by
``torch.cuda.synchronize``. :func:`op_time_breakdown` profiles one run by kind of op.

Peak memory
    * CUDA: ``torch.cuda.max_memory_allocated`` during one run, minus what was allocated before it;
    * CPU: ``tracemalloc`` does not see torch's allocator and ``ru_maxrss`` only ever grows, so the
      bytes are measured explicitly: :class:`PeakTensorBytes` is a ``TorchDispatchMode`` that adds up
      the storages created by every aten op while any tensor viewing them is alive, during one extra
      untimed run. It counts activations (and caches) created by the run, not weights or inputs, and
      not scratch memory private to a fused kernel (e.g. inside CPU flash attention).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, list[float], Any]:
    """Median time of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones (and the last output).

    ``clock``: wall time by default; ``time.process_time`` times this process's CPU time (steadier on a shared CPU).
    """
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = clock()
        out = fn()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times), times, out


def interleaved(
    configs: dict[Any, tuple[Callable[[], Any], Callable[[], Any]]], repeats: int, warmup: int, device: torch.device,
    *, clock: Callable[[], float] = time.perf_counter, prime: bool = False,
) -> tuple[dict[Any, float], dict[Any, Any]]:
    """Time every ``(setup, fn)`` of ``configs`` in rounds: each round runs each config once (``setup()`` untimed,
    then ``fn`` timed on ``clock``), ``warmup`` untimed rounds first, so slow drift of a shared machine hits all
    configs alike. ``prime``: one untimed ``fn()`` right before each timed one, so no config pays for the memory
    its predecessor in the round freed (page faults count as CPU time). Returns the median per config and each
    config's last output."""
    times: dict[Any, list[float]] = {key: [] for key in configs}
    outs: dict[Any, Any] = {}
    for round_ in range(warmup + max(1, repeats)):
        for key, (setup, fn) in configs.items():
            setup()
            if prime and round_ >= warmup:
                fn()
            sync(device)
            t0 = clock()
            outs[key] = fn()
            sync(device)
            if round_ >= warmup:
                times[key].append(clock() - t0)
    return {key: statistics.median(v) for key, v in times.items()}, outs


#: aten ops counted as "linear" / "attention" by :func:`op_time_breakdown` (everything else is "other").
LINEAR_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def op_time_breakdown(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Seconds of one profiled run of ``fn`` by kind of op: ``attention`` (stock attention kernels — any op named
    ``*scaled_dot_product*`` — and every op inside dymu's VTU attention function, whatever it computes with),
    ``linear`` (the other matrix products: the model's projections and MLP) and ``other``; self time, so nothing
    counts twice (device time on CUDA).

    Unlike the difference of two timed runs, it separates the model's matrix products — which on a shared VM
    swing by ±10% between identical runs — from what an attention implementation costs."""
    from torch.profiler import ProfilerActivity, profile

    from dymu.vtu.integration import PROFILER_LABEL

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silence kineto's start/stop lines on stderr
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    kinds = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # device kernels: counted in the device time of the op that launched them
        micros = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        # the VTU range itself (its own self time: the Python between its ops), the ops inside it, stock SDPA
        if event.name == PROFILER_LABEL or _inside(event, PROFILER_LABEL) or "scaled_dot_product" in event.name:
            kind = "attention"
        else:
            kind = "linear" if event.name in LINEAR_OPS else "other"
        kinds[kind] += micros / 1e6
    return kinds


def _inside(event: Any, label: str) -> bool:
    """Whether a profiler event ran inside a ``record_function(label)`` range."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == label:
            return True
        parent = parent.cpu_parent
    return False


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the ``with`` block (CPU or any device).

    A storage is counted from the op that creates it until the last tracked tensor viewing it dies.
    Outputs aliasing an input that was not created inside the block (a weight, the input batch) are
    not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[tuple[str, int], list[int]] = {}  # storage key -> [live tensors, nbytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {self._key(t) for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        try:
            return (str(t.device), t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            return ("", 0)

    def _track(self, t: torch.Tensor, inputs: set) -> None:
        key = self._key(t)
        if key[1] == 0:
            return
        entry = self._refs.get(key)
        if entry is None:
            if key in inputs:  # a view of an untracked tensor (weights, inputs)
                return
            nbytes = t.untyped_storage().nbytes()
            entry = self._refs[key] = [0, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._refs[key]


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Peak bytes allocated by one run of ``fn`` (see the module docstring for the method per device)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    tracker = PeakTensorBytes()
    with tracker:
        out = fn()
    return tracker.peak, out


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one run, minus memory allocated before it"
    return "peak live tensor bytes created during one untimed run (dispatch-mode tracker; weights and inputs excluded)"


def maxrss_bytes() -> int:
    """This process's peak resident set size so far (whole run; Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def cache_bytes(cache: Any) -> int:
    """Bytes of keys + values held by a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """A performance goal, printed next to the measured figure (PASS/MISS; never asserted)."""

    name: str
    measured: float
    goal: float
    higher_is_better: bool = True
    unit: str = "x"

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.measured):
            return False
        return self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return (
            f"  [{'PASS' if self.passed else 'MISS'}] {self.name}: measured {self.measured:.3f}{self.unit} "
            f"(target {op} {self.goal:g}{self.unit})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "goal": self.goal, "passed": self.passed}


# -------------------------------------------------------------------------------------------- output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def environment_line(device: torch.device, dtype: torch.dtype) -> str:
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return (
        f"device: {device} ({where}); dtype {str(dtype).removeprefix('torch.')}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as the description, from "Examples:" on as the epilog."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog=doc[doc.index("Examples:"):] if "Examples:" in doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def closing_lines(res: dict[str, Any], heading: str = "targets (not asserted):") -> list[str]:
    """The last lines of a benchmark's report: its targets (PASS/MISS) and the process peak RSS."""
    rss = f"process peak RSS (whole run): {human_bytes(res['maxrss_bytes'])}"
    return [heading, *(t.line() for t in res["_targets"]), rss]


def make_main(
    parse_args: Callable[[Sequence[str] | None], Any],
    run: Callable[[Any], dict[str, Any]],
    format_results: Callable[[dict[str, Any]], str],
) -> Callable[[Sequence[str] | None], int]:
    """A benchmark's ``main(argv)``: parse, run, print the report, return 0."""

    def main(argv: Sequence[str] | None = None) -> int:
        print(format_results(run(parse_args(argv))))
        return 0

    return main


def clip_tower(
    *, hidden: int, mlp: int, layers: int, heads: int, image_size: int, patch_size: int = 14, **config: Any
) -> tuple[Any, Any]:
    """A CLIP vision config of the given shape (random-weight benchmarks) and the matching image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch_size, **config,
    )
    return vision, CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)


def add_common_arguments(parser, *, repeats: int, warmup: int = 1, threads: str | None = None) -> None:
    """--device, --dtype, --repeats, --warmup, --seed, --threads, --tiny. ``threads``: the bench times a list of
    thread counts (``--threads 1,2,default``, read by :func:`parse_thread_counts`), this one by default."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="default: float32"
    )
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per configuration (default: {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs first (default: {warmup})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    if threads is None:
        parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    else:
        parser.add_argument("--threads", default=threads, help="torch CPU thread counts to time, comma-separated; "
                            f"'default' = torch's choice (default: {threads})")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration (used by the tests)")


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def parse_thread_counts(text: str) -> list[int | None]:
    """``"1,2,default"`` -> ``[1, 2, None]`` (None: torch's default thread count)."""
    counts: list[int | None] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part == "default":
            counts.append(None)
        elif part.isdigit() and int(part) > 0:
            counts.append(int(part))
        else:
            raise ValueError(f"expected positive thread counts or 'default', comma-separated; got {part!r}")
    if not counts:
        raise ValueError("expected at least one thread count")
    return counts


def thread_label(threads: int | None, actual: int) -> str:
    """A row label: ``"2"``, or ``"default (2)"`` for torch's default."""
    return str(threads) if threads is not None else f"default ({actual})"


def interleaved_wall_and_cpu(
    configs: dict[Any, tuple[Callable[[], Any], Callable[[], Any]]], repeats: int, warmup: int, device: torch.device,
) -> tuple[dict[Any, float], dict[Any, float], dict[Any, Any]]:
    """:func:`interleaved` on both clocks at once: median wall time, median CPU time of this process (user +
    system: with several threads it exceeds the wall time when they all compute, and falls short when they wait
    to be scheduled on a busy machine) and each config's last output."""
    wall: dict[Any, list[float]] = {key: [] for key in configs}
    cpu: dict[Any, list[float]] = {key: [] for key in configs}
    outs: dict[Any, Any] = {}
    for round_ in range(warmup + max(1, repeats)):
        for key, (setup, fn) in configs.items():
            setup()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            outs[key] = fn()
            sync(device)
            if round_ >= warmup:
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()},
            outs)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def eval_script(name: str):
    """``eval_scripts/<name>.py`` as a module, loaded once (registered first: its dataclasses look the module up)."""
    import importlib.util
    import sys

    key = f"_dymu_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "eval_scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def ideal_block(layer: torch.nn.Module, x: torch.Tensor, n_next: int) -> torch.Tensor:
    """One stock ViT block (CLIP/SigLIP or DINOv2) as DToMe runs it, minus the bookkeeping: attention at ``x``'s
    count, then the MLP at ``n_next`` tokens (DToMe merges between the two; a slice stands in for the merge)."""
    if hasattr(layer, "self_attn"):  # CLIP / SigLIP: layer_norm1 → self_attn → + → layer_norm2 → mlp → +
        h = (x + layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=None)[0])[:, :n_next]
        return h + layer.mlp(layer.layer_norm2(h))
    # DINOv2: norm1 → attention → layer_scale1 → + → norm2 → mlp → layer_scale2 → +
    h = (x + layer.layer_scale1(layer.attention(layer.norm1(x))[0]))[:, :n_next]
    return h + layer.layer_scale2(layer.mlp(layer.norm2(h)))


def ideal_runner(
    embeddings: torch.nn.Module, layers: Sequence[torch.nn.Module], per_layer: torch.Tensor,
    pixels: Sequence[torch.Tensor], *, width: int, seed: int, device: torch.device, dtype: torch.dtype,
) -> Callable[[], None]:
    """The best any DToMe implementation could do: the embeddings at full length, then block ``l`` of image ``b``
    with attention on ``per_layer[l, b]`` tokens and the MLP on ``per_layer[l + 1, b]`` (``per_layer [L+1, B]``, a
    run's ``tokens_per_layer``), image by image, no merge bookkeeping. Returns the callable to time."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [[torch.randn(1, int(per_layer[l, b]), width, generator=gen).to(device, dtype)
               for l in range(len(layers))] for b in range(per_layer.shape[1])]

    def run() -> None:
        with torch.inference_mode():
            for b, x in enumerate(pixels):
                embeddings(x)
                for l, layer in enumerate(layers):
                    ideal_block(layer, inputs[b][l], int(per_layer[l + 1, b]))

    return run
