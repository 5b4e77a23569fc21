"""Run a benchmark from the repository's bench/ folder (the same as `python -m bench.NAME ...`).

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
import importlib
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

NAME = "bench"
HELP = "run a benchmark from bench/ (encoder, vtu_prefill, e2e_llava, onevision_crops, qwen_tower)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("name", nargs="?", help="benchmark name (see --list)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark")


def bench_package() -> ModuleType:
    """The repository's ``bench`` package (it sits next to ``src/``; it is not part of the installed wheel)."""
    root = Path(__file__).resolve().parents[3]  # <repo>/src/dymu/commands/bench.py -> <repo>
    if (root / "bench" / "_common.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        package = importlib.import_module("bench")
    except ImportError:
        package = None
    if package is None or not (Path(next(iter(package.__path__))) / "_common.py").is_file():
        raise FileNotFoundError(
            "the benchmark scripts live in the dymu repository's bench/ folder, which an installed wheel does not "
            "include: run from a checkout (pip install -e .) or use `python -m bench.NAME` in the repository root"
        )
    return package


def available(package: ModuleType) -> dict[str, str]:
    """Benchmark name -> first line of its docstring."""
    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        spec = info.module_finder.find_spec(info.name)  # type: ignore[union-attr]
        summary = ""
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            summary = _first_docstring_line(Path(spec.origin))
        found[info.name] = summary
    return found


def _first_docstring_line(path: Path) -> str:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    package = bench_package()
    names = available(package)
    if args.list or not args.name:
        print("benchmarks (dymu bench NAME [options]; NAME --help for options):")
        width = max(map(len, names), default=0)
        for name, summary in names.items():
            print(f"  {name:<{width}}  {summary}")
        return 0 if args.list else 2
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; expected one of: {', '.join(names)}")
    module = importlib.import_module(f"{package.__name__}.{args.name}")
    try:
        return int(module.main(list(args.args)) or 0)
    except SystemExit as exc:  # argparse inside the benchmark (--help, bad options)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
