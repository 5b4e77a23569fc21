"""End-to-end LLaVA-1.5 with DyMU: latency and tokens/s of prefill + N decode steps, stock vs DyMU.

The model is transformers' ``LlavaForConditionalGeneration`` built from a config with random weights
(only shapes matter for time): a CLIP ViT-L/14-336-shaped tower (features of the second-to-last
layer, CLS dropped), LLaVA-1.5's 2-layer MLP projector (GELU) and a few Llama-2-7B-shaped decoder
layers (hidden 4096, 32 heads, MLP 11008). Prompt: ``--text`` text tokens around one ``<image>``
(576 placeholders). Configurations, timed side by side in one run:

* ``stock``: the unmodified model, all 576 visual tokens;
* ``dymu vtu=fast`` / ``vtu=exact`` / ``vtu=off``: :func:`dymu.vlm.llava.enable_dymu` with "72out"
  thresholds found on the random tower (``merge_schedule("constant", 504, layers)`` over built-in
  images) and a threshold offset calibrated so the benchmark images keep ``--visual-tokens`` (72)
  tokens on average — random weights spread per-image counts unlike a real CLIP, so the offset pins
  the count the figures are about. ``vtu=off`` is plain merged tokens at consecutive positions.

Each configuration runs ``generate`` (greedy, exactly ``--new-tokens`` new tokens), all of them once per
round in interleaved rounds (``--clock cpu --threads 1`` for this process's CPU time, the steadiest measure on a
shared CPU). A logits processor stamps the time the first logits arrive, which splits each run into time to first token
(vision encoding + projector + prefill) and decode. Reported: medians of TTFT, total latency,
decode tokens/s = (N − 1) / (total − TTFT), end-to-end tokens/s = N / total, speed-ups vs stock, the
KV cache held after generation and the peak memory of one run. Fast and exact VTU must generate the
same tokens (printed as a check).

Examples:
  python -m bench.e2e_llava                         # CPU defaults: 8 vision layers, 2 decoder layers
  python -m bench.e2e_llava --threads 1 --clock cpu # the same, steadier on a shared CPU
  python -m bench.e2e_llava --vision-layers 24 --text-layers 4 --new-tokens 32
  python -m bench.e2e_llava --device cuda --dtype float16 --vision-layers 24 --text-layers 32
  dymu bench e2e_llava --tiny
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LogitsProcessorList

import dymu
from dymu.bench.memory import cache_bytes, maxrss_bytes, memory_method, peak_memory
from dymu.bench.options import add_common_arguments, apply_threads, argument_parser, make_main, resolve_device
from dymu.bench.report import Target, closing_lines, compare_to_first, environment_line, format_table, human_bytes
from dymu.bench.timing import interleaved, sync
from dymu.bench.towers import clip_tower
from dymu.samples import KINDS, image_set, make_image
from dymu.vlm.llava import disable_dymu, enable_dymu, full_image_tokens
from dymu.vtu import VTU_MODES, output_cache

FULL_VISION_LAYERS, FULL_TEXT_LAYERS = 24, 32


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m bench.e2e_llava", __doc__)
    p.add_argument("--vision-layers", type=int, help="CLIP blocks (default: 8 on CPU, 24 on CUDA)")
    p.add_argument("--text-layers", type=int, help="Llama decoder layers (default: 2 on CPU, 32 on CUDA)")
    p.add_argument("--visual-tokens", type=float, default=72.0, help="mean visual tokens kept by DyMU (default: 72)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (default: 16)")
    p.add_argument("--text", type=int, default=64, help="text tokens in the prompt, 8 before the image (default: 64)")
    p.add_argument("--batch", type=int, default=1, help="prompts (one image each) per generate call (default: 1)")
    p.add_argument("--vocab", type=int, default=1024,
                   help="vocabulary size (default: 1024; LLaVA's 32064 would make the LM head a large share of "
                        "a few-layer decoder)")
    p.add_argument("--modes", default=",".join(VTU_MODES), help="VTU modes to run with DyMU (default: fast,exact,off)")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--vision-hidden", type=int, default=1024)
    p.add_argument("--vision-heads", type=int, default=16)
    p.add_argument("--vision-mlp", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096, help="decoder hidden size (default: 4096)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared CPU; use with --threads 1)")
    add_common_arguments(p, repeats=2)
    args = p.parse_args(argv)
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        p.error("--clock cpu measures host CPU time; use it with --device cpu")
    if args.tiny:
        args.vision_layers, args.text_layers, args.image_size = 3, 2, 84
        args.vision_hidden, args.vision_heads, args.vision_mlp = 64, 4, 128
        args.hidden, args.heads, args.mlp, args.vocab = 64, 4, 128, 128
        args.visual_tokens, args.new_tokens, args.text, args.repeats, args.warmup = 12.0, 4, 8, 1, 1
    cuda = args.device.startswith("cuda")
    if args.vision_layers is None:
        args.vision_layers = FULL_VISION_LAYERS if cuda else 8
    if args.text_layers is None:
        args.text_layers = FULL_TEXT_LAYERS if cuda else 2
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.mode_list:
        if m not in VTU_MODES:
            p.error(f"--modes: unknown VTU mode {m!r} (expected {', '.join(VTU_MODES)})")
    if args.vision_layers < 2:
        p.error("--vision-layers must be >= 2 (LLaVA takes the second-to-last layer)")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")
    patches = (args.image_size // 14) ** 2
    if not 1 <= args.visual_tokens < patches:
        p.error(f"--visual-tokens must be in 1..{patches - 1}")
    return args


def build_llava(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(args.seed)
    vision, processor = clip_tower(
        hidden=args.vision_hidden, mlp=args.vision_mlp, layers=args.vision_layers, heads=args.vision_heads,
        image_size=args.image_size,
    )
    text = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.text_layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=args.vocab - 1, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    return model, processor


def prompt_ids(args: argparse.Namespace, full_count: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, text + full_count]``: BOS, a few text tokens, 576 image placeholders, the rest of the text."""
    before = min(8, args.text)
    rows = []
    for _ in range(args.batch):
        text = torch.randint(3, args.vocab - 1, (args.text,), generator=generator)
        rows.append(torch.cat([torch.tensor([1]), text[: before - 1] if before else text[:0],
                               torch.full((full_count,), args.vocab - 1), text[max(before - 1, 0) :]]))
    return torch.stack(rows)


class FirstLogitsClock:
    """A logits processor that records when the first logits (end of prefill) arrive."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.device, self.clock, self.first = device, clock, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            sync(self.device)
            self.first = self.clock()
        return scores


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; return every figure (also what :func:`format_results` prints)."""
    apply_threads(args.threads)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, processor = build_llava(args, device, dtype)
    build_s = time.perf_counter() - t0
    full_count = full_image_tokens(model)
    gen = torch.Generator().manual_seed(args.seed)
    images = [make_image(KINDS[(1 + i) % len(KINDS)], args.image_size, seed=100 + i) for i in range(args.batch)]
    pixel_values = processor(images=images, return_tensors="pt").pixel_values.to(device, dtype)
    input_ids = prompt_ids(args, full_count, gen).to(device)
    attention_mask = torch.ones_like(input_ids)

    # -- "72out" thresholds on the random tower, then an offset pinning the benchmark images' mean count
    t0 = time.perf_counter()
    tower = model.model.vision_tower
    patches = full_count
    counts = dymu.merge_schedule("constant", patches - round(args.visual_tokens), args.vision_layers)
    calib = processor(images=image_set(8, args.image_size), return_tensors="pt").pixel_values.to(device, dtype)
    dymu.patch(tower, merge_counts=counts)
    with torch.inference_mode():
        tower(pixel_values=calib)
    thresholds = list(dymu.last_run(tower).found_thresholds)
    dymu.configure(tower, thresholds=thresholds)
    layer = model.config.vision_feature_layer
    offset = dymu.calibrate_budget(tower, pixel_values, args.visual_tokens, layer=layer, max_evaluations=16).offset
    dymu.unpatch(tower)
    finding_s = time.perf_counter() - t0

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def generate() -> tuple[Any, float, float]:
        stamp = FirstLogitsClock(device, clock)
        sync(device)
        start = clock()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                logits_processor=LogitsProcessorList([stamp]), return_dict_in_generate=True,
            )
        sync(device)
        end = clock()
        return out, stamp.first - start, end - start

    configs = [("stock", None)] + [(f"dymu vtu={m}", m) for m in args.mode_list]
    runs: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name, _ in configs}

    def setup(mode: str | None):
        def switch() -> None:
            disable_dymu(model)
            if mode is not None:
                enable_dymu(model, thresholds, vtu=mode, threshold_offset=offset)
        return switch

    def timed(name: str, mode: str | None):
        def call():
            out, first, total = generate()
            visual = list(out.visual_token_counts) if mode is not None else [full_count] * args.batch
            runs[name].append((first, total, visual))
            return out
        return call

    # interleaved rounds (every config once per round), so a shared machine's drift hits all configs alike
    _, outs = interleaved({name: (setup(mode), timed(name, mode)) for name, mode in configs},
                          args.repeats, args.warmup, device, clock=clock)
    rows: list[dict[str, Any]] = []
    generated: dict[str, torch.Tensor] = {}
    for name, mode in configs:
        setup(mode)()
        peak, _ = peak_memory(lambda: generate(), device)
        timed_runs = runs[name][args.warmup:]  # the rounds after the warm-up ones
        t_first = statistics.median(first for first, _, _ in timed_runs)
        t_total = statistics.median(total for _, total, _ in timed_runs)
        decode_s = t_total - t_first
        new = args.new_tokens * args.batch
        out = outs[name]
        rows.append({
            "config": name, "visual_tokens": timed_runs[-1][2], "ttft_s": t_first, "total_s": t_total,
            "decode_tokens_per_s": (args.new_tokens - 1) * args.batch / decode_s if decode_s > 0 else float("inf"),
            "tokens_per_s": new / t_total, "kv_cache_bytes": cache_bytes(output_cache(out)), "peak_bytes": peak,
            "prompt_tokens": int(input_ids.shape[1]),
        })
        generated[name] = out.sequences[:, -args.new_tokens :].cpu()
    disable_dymu(model)

    compare_to_first(rows, speedups={"ttft_speedup": "ttft_s", "total_speedup": "total_s"},
                     ratios={"decode_vs_stock": "decode_tokens_per_s", "kv_vs_stock": "kv_cache_bytes",
                             "peak_vs_stock": "peak_bytes"})
    by_name = {r["config"]: r for r in rows}
    checks = {}
    if "dymu vtu=fast" in generated and "dymu vtu=exact" in generated:
        checks["fast and exact VTU generate the same tokens"] = bool(
            torch.equal(generated["dymu vtu=fast"], generated["dymu vtu=exact"]))
    targets = []
    if "dymu vtu=fast" in by_name:
        fast = by_name["dymu vtu=fast"]
        targets.append(Target("time to first token, stock / DyMU vtu=fast", fast["ttft_speedup"], 3.5))
        if "dymu vtu=off" in by_name:
            targets.append(Target("VTU fast over plain merged (time to first token)",
                                  fast["ttft_s"] / by_name["dymu vtu=off"]["ttft_s"], 1.05, higher_is_better=False))
        if "dymu vtu=exact" in by_name:
            targets.append(Target("VTU exact over VTU fast (time to first token)",
                                  by_name["dymu vtu=exact"]["ttft_s"] / fast["ttft_s"], 2.5, higher_is_better=False))
        # a decode step on the merged cache at most 1.2x a stock step: tokens/s at least 1/1.2 of stock
        targets.append(Target("decode step, DyMU vtu=fast / stock (time per token)", 1 / fast["decode_vs_stock"], 1.2,
                              higher_is_better=False))
    return {
        "benchmark": "e2e_llava", "vision_layers": args.vision_layers, "text_layers": args.text_layers,
        "batch": args.batch, "new_tokens": args.new_tokens, "text": args.text, "vocab": args.vocab,
        "repeats": args.repeats, "warmup": args.warmup, "clock": args.clock, "device": str(device), "dtype": args.dtype,
        "environment": environment_line(device, dtype), "thresholds": thresholds, "threshold_offset": offset,
        "build_s": build_s, "finding_s": finding_s, "rows": rows, "checks": checks,
        "targets": [t.as_dict() for t in targets], "_targets": targets, "memory_method": memory_method(device),
        "maxrss_bytes": maxrss_bytes(), "full_visual_tokens": full_count,
    }


def format_results(res: dict[str, Any]) -> str:
    lines = [
        f"LLaVA-1.5 end to end (random weights): CLIP ViT-L/14-336-shaped tower, {res['vision_layers']} of "
        f"{FULL_VISION_LAYERS} layers; Llama-7B-shaped decoder, {res['text_layers']} of {FULL_TEXT_LAYERS} layers; "
        f"vocab {res['vocab']}",
        res["environment"],
    ]
    if res["vision_layers"] < FULL_VISION_LAYERS or res["text_layers"] < FULL_TEXT_LAYERS:
        lines.append(
            "note: fewer layers than LLaVA-1.5-7B to fit the CPU; the vision/decoder balance differs from the full "
            "model (the full decoder is ~16x deeper), so read the DyMU/stock ratios per part from bench.encoder and "
            "bench.vtu_prefill"
        )
    lines += [
        f"prompt: batch {res['batch']}, {res['text']} text tokens + {res['full_visual_tokens']} image placeholders; "
        f"{res['new_tokens']} new tokens per prompt (greedy)",
        f"DyMU thresholds: {len(res['thresholds'])} layers found on the random tower, offset {res['threshold_offset']:+.4f} "
        f"calibrated on the benchmark images ({res['finding_s']:.1f} s); model built in {res['build_s']:.1f} s",
        f"times ({res['clock']} clock): median of {res['repeats']} interleaved round(s) after {res['warmup']} warm-up "
        "round(s), every config once per round; TTFT = vision + projector + prefill; decode tok/s = (N-1)*batch / "
        "(total - TTFT)",
        f"peak memory: {res['memory_method']}",
        "",
    ]
    table = [
        [r["config"], ",".join(map(str, r["visual_tokens"])), r["ttft_s"], f"{r['ttft_speedup']:.2f}x", r["total_s"],
         f"{r['total_speedup']:.2f}x", f"{r['decode_tokens_per_s']:.2f}", f"{r['decode_vs_stock']:.2f}x",
         f"{r['tokens_per_s']:.2f}", human_bytes(r["kv_cache_bytes"]), f"{r['kv_vs_stock']:.3f}",
         human_bytes(r["peak_bytes"]), f"{r['peak_vs_stock']:.3f}"]
        for r in res["rows"]
    ]
    lines.append(format_table(
        ["config", "visual_tok", "ttft_s", "ttft_speedup", "total_s", "total_speedup", "decode_tok/s", "decode_vs_stock",
         "e2e_tok/s", "kv_cache", "kv_vs_stock", "peak", "peak_vs_stock"],
        table,
    ))
    lines.append("")
    for name, ok in res["checks"].items():
        lines.append(f"check: {name}: {'yes' if ok else 'NO'}")
    lines += closing_lines(
        res, "targets (not asserted; the prefill target is meant for the full decoder, see bench.vtu_prefill):"
    )
    return "\n".join(lines)


main = make_main(parse_args, run, format_results)
