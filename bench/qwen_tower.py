"""DToMe inside a Qwen2.5-VL-7B-shaped vision tower: stock vs merged at a few kept shares, CPU ratios side by side.

``python -m bench.qwen_tower`` from the repository root, the same as ``dymu bench qwen_tower``: the benchmark is
:mod:`dymu.bench.qwen_tower` (``--help`` says what it measures and how).
"""

from dymu.bench.qwen_tower import format_results, main, parse_args, run  # noqa: F401 (its old import path)

if __name__ == "__main__":
    raise SystemExit(main())
