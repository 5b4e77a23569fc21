"""Run a benchmark of :mod:`dymu.bench` (in a checkout, the same as `python -m bench.NAME ...`).

Benchmarks build random-weight models of the real shapes (no downloads) and print the ratios that
matter side by side from one run, with medians after warm-up, peak memory and the performance
targets (PASS/MISS). Every benchmark takes --device (e.g. cuda), --dtype, --repeats, --warmup and
--tiny (a seconds-long smoke configuration); everything after NAME goes to the benchmark
(`dymu bench NAME --help` lists its options). See docs/performance.md.

Examples:
  dymu bench --list
  dymu bench encoder                      # ViT-L/14-336-shaped tower, 72/192/384out vs no merging
  dymu bench encoder --full --device cuda --dtype float16
  dymu bench vtu_prefill --merged 90 195 394
  dymu bench e2e_llava --new-tokens 32
  dymu bench e2e_llava --tiny
  dymu bench onevision_crops --layers 4 --crops 6   # OneVision crops: padded vs one call per crop
  dymu bench qwen_tower --layers 8                  # Qwen2.5-VL-7B-shaped vision tower, kept shares vs stock
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
from pathlib import Path

from dymu.bench import BENCHMARKS

NAME = "bench"
HELP = "run a benchmark (encoder, vtu_prefill, e2e_llava, e2e_small_vlm, onevision_crops, qwen_tower)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("name", nargs="?", help="benchmark name (see --list)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark")


def available() -> dict[str, str]:
    """Benchmark name -> first line of its docstring (read from the source: listing imports no benchmark)."""
    found = {}
    for name in BENCHMARKS:
        spec = importlib.util.find_spec(f"dymu.bench.{name}")
        found[name] = _first_docstring_line(Path(spec.origin)) if spec is not None and spec.origin else ""
    return found


def _first_docstring_line(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    names = available()
    if args.list or not args.name:
        print("benchmarks (dymu bench NAME [options]; NAME --help for options):")
        width = max(map(len, names), default=0)
        for name, summary in names.items():
            print(f"  {name:<{width}}  {summary}")
        return 0 if args.list else 2
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; expected one of: {', '.join(names)}")
    module = importlib.import_module(f"dymu.bench.{args.name}")
    try:
        return int(module.main(list(args.args)) or 0)
    except SystemExit as exc:  # argparse inside the benchmark (--help, bad options)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
