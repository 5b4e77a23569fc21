"""End to end on the small real VLM: full tokens vs DyMU, answering easy-VQA questions, at several thread counts.

``python -m bench.e2e_small_vlm`` from the repository root, the same as ``dymu bench e2e_small_vlm``: the benchmark is
:mod:`dymu.bench.e2e_small_vlm` (``--help`` says what it measures and how).
"""

from dymu.bench.e2e_small_vlm import format_results, main, parse_args, run  # noqa: F401 (its old import path)

if __name__ == "__main__":
    raise SystemExit(main())
