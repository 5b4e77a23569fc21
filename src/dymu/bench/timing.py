"""Timing of the benchmarks: interleaved rounds, medians, a profile by kind of op.

:func:`interleaved` runs every configuration once per round, ``warmup`` untimed rounds then ``repeats`` timed ones,
and reports medians (the benchmarks compare configurations this way, so a shared machine's drift hits all alike);
:func:`median_time` times one function alone. On CUDA each run is bracketed by ``torch.cuda.synchronize``.
:func:`op_time_breakdown` profiles one run by kind of op.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from dymu.vtu.integration import PROFILER_LABEL


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
