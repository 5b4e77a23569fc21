"""Prefill cost of VTU vs stock full length vs plain merged tokens, on 7B-shaped decoder layers.

A LLaVA-1.5-like sequence: 576 visual tokens (+ text) merged by DToMe to ~90 visual tokens. Four
prefills of the same decoder (random weights; only shapes matter for time):

* ``full (stock sdpa)``: all virtual tokens, the stock model — the baseline (ratio 1.0);
* ``merged, no VTU``: the merged tokens alone at consecutive positions — the cost floor (wrong
  positions, no unmerging);
* ``VTU fast`` / ``VTU exact``: merged tokens with virtual token unmerging (:mod:`dymu.vtu`).

Each is timed ``--repeats`` times after ``--warmup`` runs; medians and ratios to the full prefill are
printed, together with the KV-cache bytes held after prefill, the time of one decode step on top of
each prefill's cache, and the largest difference between the VTU fast and exact outputs (a sanity
check, not a timing).

``--merged 90 195 394`` times several merged counts in one run (~72out/192out/384out of CLIP
ViT-L/14-336 with DToMe); the full prefill is timed once. Targets are printed next to the ratios
(PASS/MISS, not asserted): VTU fast at ~90 visual tokens >= 3.5x faster than full; VTU fast <= 1.05x
plain merged; VTU exact prefill <= 2.5x VTU fast; a VTU fast decode step <= 1.2x a stock step (dymu decodes
fast mode with the exact kernel; the "fast-kernel step" row shows the fast kernel's step for comparison).

Run: ``python -m bench.vtu_prefill --layers 2`` (7B shape on CPU takes a few minutes);
``--tiny`` is a seconds-long smoke configuration used by the test suite. On a shared, busy CPU, wall
times of memory-bound and compute-bound work are distorted differently; ``--threads 1 --clock cpu``
times this process's CPU time on one thread, which keeps the ratios steady.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

if not __package__:  # run as a file (python bench/vtu_prefill.py): make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common  # noqa: E402
from bench._common import argument_parser, cache_bytes  # noqa: E402
from dymu.vtu import integration as vtu_integration  # noqa: E402
from dymu.vtu import (  # noqa: E402
    cache_kwarg, concat_groups, disable_vtu, enable_vtu, output_cache, prepare_vtu, vtu_context,
)

ROW_NAMES = ("full (stock sdpa)", "merged, no VTU", "VTU fast", "VTU exact")
FAST_KERNEL_DECODE = "VTU fast, fast-kernel step"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m bench.vtu_prefill", __doc__)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (default 4096)")
    p.add_argument("--mlp", type=int, default=11008, help="MLP intermediate size (default 11008)")
    p.add_argument("--heads", type=int, default=32, help="attention heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = heads)")
    p.add_argument("--visual", type=int, default=576, help="visual tokens before merging (default 576)")
    p.add_argument("--merged", type=int, nargs="+", default=[90],
                   help="visual tokens after merging; several values are timed in one run (default 90)")
    p.add_argument("--text", type=int, default=64, help="text tokens, 8 before the image, rest after (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared CPU; use with --threads 1)")
    p.add_argument("--skip-exact", action="store_true", help="do not time the (slow) exact path")
    p.add_argument("--tiny", action="store_true", help="tiny smoke shapes (for tests): overrides sizes")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.mlp, args.heads, args.kv_heads = 1, 64, 128, 4, 2
        args.visual, args.text, args.repeats, args.warmup = 48, 8, 1, 1
        args.merged = [12] if args.merged == [90] else args.merged
    args.kv_heads = args.kv_heads or args.heads
    for merged in args.merged:
        if not 1 <= merged <= args.visual:
            p.error(f"--merged must be in 1..--visual ({args.visual}), got {merged}")
    return args


def visual_groups(n_visual: int, n_merged: int, generator: torch.Generator) -> torch.Tensor:
    """A random DToMe-like group map: every slot covered, slots numbered by their first member."""
    slot = torch.randint(0, n_merged, (n_visual,), generator=generator)
    slot[torch.randperm(n_visual, generator=generator)[:n_merged]] = torch.arange(n_merged)
    first = torch.full((n_merged,), n_visual).scatter_reduce(0, slot, torch.arange(n_visual), "amin")
    rank = torch.empty(n_merged, dtype=torch.long)
    rank[torch.argsort(first)] = torch.arange(n_merged)
    return rank[slot]


CLOCK: Callable[[], float] = time.perf_counter  # time.process_time with --clock cpu


def median_time(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> tuple[float, object]:
    """:func:`bench._common.median_time` on :data:`CLOCK`: the median and the last output."""
    median, _, out = _common.median_time(fn, repeats, warmup, device, clock=CLOCK)
    return median, out


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import LlamaConfig, LlamaModel

    global CLOCK
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time; use it with --device cpu")
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=32,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaModel(config).to(dtype).eval()
    cache_name = cache_kwarg(model)  # "cache" from transformers 5.24 on, "past_key_values" before

    before = min(8, args.text)
    n_virtual = before + args.visual + args.text - before
    full = torch.randn(1, n_virtual, args.hidden, generator=gen).to(device, dtype)

    def run(embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        with torch.inference_mode():
            return model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=True)

    def decode_step(out, position: int, cache_len: int) -> Callable[[], object]:
        """One decode step on top of a prefill's cache (cropped back after each run, so runs are alike)."""
        token = torch.randn(1, 1, args.hidden, generator=gen).to(device, dtype)
        cache = output_cache(out)

        def step():
            with torch.inference_mode():
                res = model(inputs_embeds=token, **{cache_name: cache}, use_cache=True,
                            position_ids=torch.tensor([[position]], device=device),
                            attention_mask=torch.ones(1, cache_len + 1, dtype=torch.long, device=device))
            cache.crop(-1)  # drop the step's token again
            return res

        return step

    def time_decode(out, position: int, cache_len: int) -> float:
        return median_time(decode_step(out, position, cache_len), args.repeats, args.warmup, device)[0]

    ones_full = torch.ones(1, n_virtual, dtype=torch.long, device=device)
    rows: list[tuple[str, int, float, int]] = []
    decode: list[tuple[str, int, float]] = []  # one decode step: name, cache tokens, median s
    sections: list[tuple[int, int, dict[str, float], float | None]] = []  # visual merged, tokens, times, diff

    t, out = median_time(lambda: run(full, torch.arange(n_virtual, device=device)[None], ones_full),
                         args.repeats, args.warmup, device)
    rows.append((ROW_NAMES[0], n_virtual, t, cache_bytes(output_cache(out))))
    decode.append((ROW_NAMES[0], n_virtual, time_decode(out, n_virtual, n_virtual)))
    for visual_merged in args.merged:
        groups = concat_groups([before, visual_groups(args.visual, visual_merged, gen), args.text - before])
        n_merged = int(groups.max()) + 1
        batch = prepare_vtu([groups.to(device)])
        # merged inputs: each slot is the mean of its members (as DToMe's size-weighted merge does)
        merged = torch.zeros(1, n_merged, args.hidden, device=device, dtype=dtype).index_add_(1, groups.to(device), full)
        merged = merged / torch.bincount(groups, minlength=n_merged).to(device, dtype)[None, :, None]
        ones_merged = torch.ones(1, n_merged, dtype=torch.long, device=device)
        times: dict[str, float] = {}
        outs: dict[str, torch.Tensor] = {}
        t, out = median_time(lambda: run(merged, torch.arange(n_merged, device=device)[None], ones_merged),
                             args.repeats, args.warmup, device)
        rows.append((ROW_NAMES[1], n_merged, t, cache_bytes(output_cache(out))))
        decode.append((ROW_NAMES[1], n_merged, time_decode(out, n_merged, n_merged)))
        times["merged"] = t
        modes = ("fast",) if args.skip_exact else ("fast", "exact")
        for mode, name in zip(modes, ROW_NAMES[2:]):
            enable_vtu(model, mode)
            with vtu_context(batch):
                t, out = median_time(lambda: run(merged, batch.position_ids, batch.attention_mask),
                                     args.repeats, args.warmup, device)
                decode.append((name, n_merged, time_decode(out, n_virtual, n_merged)))
                if mode == "fast":  # the fast kernel at decode too (dymu decodes fast mode the exact way)
                    vtu_integration.DECODE_WITH_EXACT = False
                    try:
                        decode.append((FAST_KERNEL_DECODE, n_merged, time_decode(out, n_virtual, n_merged)))
                    finally:
                        vtu_integration.DECODE_WITH_EXACT = True
            disable_vtu(model)
            rows.append((name, n_merged, t, cache_bytes(output_cache(out))))
            times[mode] = t
            outs[mode] = out.last_hidden_state.float()
        diff = (outs["fast"] - outs["exact"]).abs().max().item() if "exact" in outs else None
        sections.append((visual_merged, n_merged, times, diff))

    print(
        f"VTU prefill benchmark: {args.layers} decoder layer(s), hidden {args.hidden}, MLP {args.mlp}, "
        f"{args.heads} heads ({args.kv_heads} kv), {args.dtype} on {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock"
    )
    print(
        f"sequence: {n_virtual} virtual tokens = {args.visual} visual + {args.text} text; visual merged to "
        + ", ".join(f"{visual} -> {tokens}" for visual, tokens, _, _ in sections) + " merged tokens"
    )
    print(f"median of {args.repeats} prefill(s) after {args.warmup} warm-up(s); ratios vs the full stock prefill")
    print()
    print(f"{'config':<20}{'tokens':>8}{'median_s':>12}{'vs_full':>10}{'kv_cache_bytes':>16}{'kv_vs_full':>12}")
    t_full, kv_full = rows[0][2], rows[0][3]
    for name, tokens, t, kv in rows:
        print(f"{name:<20}{tokens:>8d}{t:>12.4f}{t / t_full:>10.3f}{kv:>16d}{kv / kv_full:>12.3f}")
    print()
    print("one decode step on top of each prefill's cache (the VTU cache is merged-length):")
    print(f"{'config':<28}{'cache':>8}{'median_s':>12}{'vs_full':>10}")
    for name, tokens, t in decode:
        print(f"{name:<28}{tokens:>8d}{t:>12.4f}{t / decode[0][2]:>10.3f}")
    if any(diff is not None for *_, diff in sections):
        print()
    for visual_merged, _, _, diff in sections:
        if diff is not None:
            print(f"check: max |fast - exact| on the last hidden state = {diff:.3e}"
                  + (f" (visual merged to {visual_merged})" if len(sections) > 1 else ""))
    print()
    print("targets (not asserted):")
    for line in target_lines(sections, t_full, args.visual, decode):
        print("  " + line)
    return 0


def target_lines(sections, t_full: float, n_visual: int, decode=()) -> list[str]:
    """PASS/MISS lines for the targets (the ~90-token prefill goal is checked at the count closest to 90)."""

    def line(ok: bool, text: str) -> str:
        return f"[{'PASS' if ok else 'MISS'}] {text}"

    out = []
    closest = min(sections, key=lambda s: abs(s[0] - 90 * n_visual / 576))
    speedup = t_full / closest[2]["fast"]
    out.append(line(speedup >= 3.5, f"VTU fast prefill at {closest[0]} visual tokens vs full: "
                                    f"{speedup:.2f}x faster (target >= 3.5x)"))
    for visual_merged, _, times, _ in sections:
        over = times["fast"] / times["merged"]
        out.append(line(over <= 1.05, f"VTU fast vs plain merged at {visual_merged}: {over:.3f}x the time "
                                      "(target <= 1.05x)"))
        if "exact" in times:
            ratio = times["exact"] / times["fast"]
            out.append(line(ratio <= 2.5, f"VTU exact vs VTU fast prefill at {visual_merged}: {ratio:.3f}x the "
                                          "time (target <= 2.5x)"))
    if decode:
        stock = decode[0][2]
        for name, tokens, t in decode[1:]:
            if name == ROW_NAMES[2]:
                out.append(line(t / stock <= 1.2, f"VTU fast decode step on a {tokens}-token cache: "
                                                  f"{t / stock:.3f}x a stock step (target <= 1.2x)"))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
