"""Prefill cost of VTU vs stock full length vs plain merged tokens, on 7B-shaped decoder layers.

A LLaVA-1.5-like sequence: 576 visual tokens (+ text) merged by DToMe to ~90 visual tokens. Four
prefills of the same decoder (random weights; only shapes matter for time):

* ``full (stock sdpa)``: all virtual tokens, the stock model — the baseline (ratio 1.0);
* ``merged, no VTU``: the merged tokens alone at consecutive positions — the cost floor (wrong
  positions, no unmerging);
* ``VTU fast`` / ``VTU exact``: merged tokens with virtual token unmerging (:mod:`dymu.vtu`).

All prefills (every merged count, every mode) are timed in interleaved rounds — each round runs each
config once, timed right after an untimed run of the same config; ``--warmup`` untimed rounds, then
``--repeats`` timed ones — so the drift of a shared machine hits them alike; the same for one decode step
on top of each prefill's cache (5x the rounds: a step is short). Medians and ratios to the
full prefill are printed, together with the KV-cache bytes held after prefill, the largest difference
between the VTU fast and exact outputs (a sanity check, not a timing), and where VTU fast's extra time
over plain merged tokens goes, from one profiled run of each (self time of the model's matrix products, of
the attention — stock SDPA, or everything inside VTU's attention function, which by definition attends over
the virtual sequence — and of the rest).

``--family qwen2_5_vl`` times Qwen2.5-VL-7B-shaped text layers instead (hidden 3584, MLP 18944, 28 heads, 4 kv heads,
M-RoPE with sections [16, 24, 24]): the image is a grid of LLM tokens as close to square as ``--visual`` allows, at
the stock ``get_rope_index`` positions ``(s, s + row, s + col)``, text after it at ``s + max(H, W)``; the plain merged
tokens at consecutive positions.

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
import time
from typing import Callable, Sequence

import torch

from dymu.bench import timing
from dymu.bench.decoder import SHAPES, build_model, mrope_positions, visual_groups
from dymu.bench.memory import cache_bytes
from dymu.bench.options import argument_parser
from dymu.vtu import (
    cache_kwarg, concat_groups, disable_vtu, enable_vtu, output_cache, prepare_vtu, vtu_context, vtu_kernels,
)


ROW_NAMES = ("full (stock sdpa)", "merged, no VTU", "VTU fast", "VTU exact")
FAST_KERNEL_DECODE = "VTU fast, fast-kernel step"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m bench.vtu_prefill", __doc__)
    p.add_argument("--family", choices=tuple(SHAPES), default="llama",
                   help="llama: Llama-2-7B-shaped layers, 1-D RoPE; qwen2_5_vl: Qwen2.5-VL-7B-shaped text layers, "
                        "M-RoPE (default llama)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 4096; qwen2_5_vl 3584)")
    p.add_argument("--mlp", type=int, default=None, help="MLP intermediate size (default 11008; qwen2_5_vl 18944)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 32; qwen2_5_vl 28)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = heads; qwen2_5_vl 4)")
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
    for name, value in SHAPES[args.family].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tiny:
        args.layers, args.hidden, args.mlp, args.heads, args.kv_heads = 1, 64, 128, 4, 2
        args.visual, args.text, args.repeats, args.warmup = 48, 8, 1, 1
        args.merged = [12] if args.merged == [90] else args.merged
    args.kv_heads = args.kv_heads or args.heads
    for merged in args.merged:
        if not 1 <= merged <= args.visual:
            p.error(f"--merged must be in 1..--visual ({args.visual}), got {merged}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time; use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model = build_model(args, device, dtype)
    mrope = args.family != "llama"
    cache_name = cache_kwarg(model)  # "cache" from transformers 5.24 on, "past_key_values" before

    before = min(8, args.text)
    n_virtual = before + args.visual + args.text - before
    full = torch.randn(1, n_virtual, args.hidden, generator=gen).to(device, dtype)
    # RoPE positions of the full sequence ([1, N]; M-RoPE [3, 1, N]) and where decoding continues
    positions = mrope_positions(before, args.visual, args.text - before) if mrope else torch.arange(n_virtual)[None]
    full_positions = positions[:, None].to(device) if mrope else positions.to(device)
    # stock generate continues every component at the last token's + 1 (an image's last patch, if it ends the prompt)
    next_positions = (positions[..., -1:] + 1).to(device)
    next_positions = next_positions[:, None] if mrope else next_positions

    def at(position_ids: torch.Tensor) -> torch.Tensor:
        """1-D positions ``[1, S]`` as the model takes them (M-RoPE: the same in all 3 components)."""
        return position_ids[None].expand(3, -1, -1) if mrope else position_ids

    def run(embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        with torch.inference_mode():
            return model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=True)

    def decode_step(out, position_ids: torch.Tensor, cache_len: int) -> Callable[[], object]:
        """One decode step on top of a prefill's cache (cropped back after each run, so runs are alike)."""
        token = torch.randn(1, 1, args.hidden, generator=gen).to(device, dtype)
        cache = output_cache(out)

        def step():
            with torch.inference_mode():
                res = model(inputs_embeds=token, **{cache_name: cache}, use_cache=True,
                            position_ids=position_ids,
                            attention_mask=torch.ones(1, cache_len + 1, dtype=torch.long, device=device))
            cache.crop(-1)  # drop the step's token again
            return res

        return step

    ones_full = torch.ones(1, n_virtual, dtype=torch.long, device=device)

    def mode(name: str) -> Callable[[], None]:
        """Setup of a config: the model's attention switched to ``name`` ("off" = stock sdpa)."""
        def setup() -> None:
            enable_vtu(model, name) if name != "off" else disable_vtu(model)
        return setup

    def in_context(batch, fn: Callable[[], object], decode: str | None = None) -> Callable[[], object]:
        """``fn`` with the VTU batch in scope; ``decode``: the kernel forced on decode steps (None: dymu's)."""
        def call():
            with vtu_context(batch), vtu_kernels(decode=decode):
                return fn()
        return call

    # every prefill config, then timed in interleaved rounds (the drift of a shared machine hits all alike)
    prefills: dict[tuple[int, str], tuple[Callable[[], None], Callable[[], object]]] = {
        (0, "full"): (mode("off"), lambda: run(full, full_positions, ones_full)),
    }
    plan: list[tuple[int, int, object]] = []  # (visual merged, merged tokens, VTU batch)
    modes = ("fast",) if args.skip_exact else ("fast", "exact")
    for visual_merged in args.merged:
        groups = concat_groups([before, visual_groups(args.visual, visual_merged, gen), args.text - before])
        n_merged = int(groups.max()) + 1
        batch = prepare_vtu([groups.to(device)], positions=[positions.to(device)] if mrope else None)
        # merged inputs: each slot is the mean of its members (as DToMe's size-weighted merge does)
        merged = torch.zeros(1, n_merged, args.hidden, device=device, dtype=dtype).index_add_(1, groups.to(device), full)
        merged = merged / torch.bincount(groups, minlength=n_merged).to(device, dtype)[None, :, None]
        ones_merged = torch.ones(1, n_merged, dtype=torch.long, device=device)
        merged_positions = at(torch.arange(n_merged, device=device)[None])
        prefills[(visual_merged, "merged")] = (
            mode("off"), lambda m=merged, o=ones_merged, pos=merged_positions: run(m, pos, o))
        for name in modes:
            prefills[(visual_merged, name)] = (
                mode(name), in_context(batch, lambda m=merged, b=batch: run(m, b.model_position_ids, b.attention_mask)))
        plan.append((visual_merged, n_merged, batch))
    # each timed run right after an untimed one of the same config (prime)
    prefill_times, outs = timing.interleaved(prefills, args.repeats, args.warmup, device, clock=clock, prime=True)
    # one decode step on each prefill's cache, interleaved the same way
    steps = {(0, "full"): (mode("off"), decode_step(outs[(0, "full")], next_positions, n_virtual))}
    for visual_merged, n_merged, batch in plan:
        steps[(visual_merged, "merged")] = (mode("off"), decode_step(
            outs[(visual_merged, "merged")], at(torch.tensor([[n_merged]], device=device)), n_merged))
        for name in modes:
            step = decode_step(outs[(visual_merged, name)], next_positions, n_merged)
            steps[(visual_merged, name)] = (mode(name), in_context(batch, step))
            if name == "fast":  # the SDPA kernel at decode too (dymu's dispatch decodes fast mode the exact way)
                steps[(visual_merged, "fast-kernel")] = (mode("fast"), in_context(batch, step, decode="fast_sdpa"))
    # a step is short: 5x the rounds
    step_times, _ = timing.interleaved(steps, 5 * args.repeats, args.warmup, device, clock=clock, prime=True)
    mode("off")()

    label = {"merged": ROW_NAMES[1], "fast": ROW_NAMES[2], "exact": ROW_NAMES[3], "fast-kernel": FAST_KERNEL_DECODE}
    rows: list[tuple[str, int, float, int]] = [
        (ROW_NAMES[0], n_virtual, prefill_times[(0, "full")], cache_bytes(output_cache(outs[(0, "full")])))]
    decode: list[tuple[str, int, float]] = [(ROW_NAMES[0], n_virtual, step_times[(0, "full")])]
    sections: list[tuple[int, int, dict[str, float], float | None]] = []  # visual merged, tokens, times, diff
    for visual_merged, n_merged, _ in plan:
        times = {name: prefill_times[(visual_merged, name)] for name in ("merged",) + modes}
        for name in ("merged",) + modes:
            rows.append((label[name], n_merged, times[name], cache_bytes(output_cache(outs[(visual_merged, name)]))))
        for name in ("merged", "fast", "fast-kernel") + modes[1:]:
            decode.append((label[name], n_merged, step_times[(visual_merged, name)]))
        diff = None
        if "exact" in modes:
            fast, exact = (outs[(visual_merged, m)].last_hidden_state.float() for m in ("fast", "exact"))
            diff = (fast - exact).abs().max().item()
        sections.append((visual_merged, n_merged, times, diff))
    # one profiled run of plain merged and VTU fast each (after an untimed one): self time by kind of op
    profiles = {}
    for visual_merged, _, _ in plan:
        for name in ("merged", "fast"):
            setup, fn = prefills[(visual_merged, name)]
            setup()
            fn()
            profiles[(visual_merged, name)] = timing.op_time_breakdown(fn, device)
    mode("off")()

    print(
        f"VTU prefill benchmark ({args.family}): {args.layers} decoder layer(s), hidden {args.hidden}, MLP {args.mlp}, "
        f"{args.heads} heads ({args.kv_heads} kv), {args.dtype} on {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock"
    )
    print(
        f"sequence: {n_virtual} virtual tokens = {args.visual} visual + {args.text} text; visual merged to "
        + ", ".join(f"{visual} -> {tokens}" for visual, tokens, _, _ in sections) + " merged tokens"
    )
    print(f"median of {args.repeats} interleaved round(s) after {args.warmup} warm-up round(s) (decode steps: "
          f"{5 * args.repeats}); ratios vs the full stock prefill")
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
    print(f"where VTU fast's extra time over plain merged goes: one profiled run of each, self time by kind of op, "
          f"x{args.layers} layers")
    print(f"{'merged':>8}{'fast-merged_s':>15}{'linear_s':>10}{'attention_s':>13}{'other_s':>9}"
          f"{'attn_vs_merged':>16}{'fast_vs_merged_by_ops':>23}")
    for visual_merged, _, times, _ in sections:
        fast, merged = profiles[(visual_merged, "fast")], profiles[(visual_merged, "merged")]
        extra = {kind: fast[kind] - merged[kind] for kind in fast}
        base = sum(merged.values())
        by_ops = (base + extra["attention"] + extra["other"]) / base  # the linear ops' drift left out
        print(f"{visual_merged:>8d}{times['fast'] - times['merged']:>+15.4f}{extra['linear']:>+10.4f}"
              f"{extra['attention']:>+13.4f}{extra['other']:>+9.4f}{extra['attention'] / base:>+16.3f}"
              f"{by_ops:>22.3f}x")
    print("fast-merged_s: the timed medians above; then VTU fast's profiled self time minus plain merged's: linear = "
          "the model's matrix products (the same shapes in both: a difference is this machine's drift); attention = "
          "VTU's attention function (gathers to virtual length, re-rotation, scores over the virtual tokens, group "
          "sums) minus stock SDPA on the merged tokens; other = norms, RoPE tables, masks, layout, ...; "
          "attn_vs_merged = attention / plain merged's profiled total; fast_vs_merged_by_ops = (merged + attention "
          "+ other) / merged, the ratio without the linear ops' drift")
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
