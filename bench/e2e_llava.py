"""End-to-end LLaVA-1.5 with DyMU: latency and tokens/s of prefill + N decode steps, stock vs DyMU.

``python -m bench.e2e_llava`` from the repository root, the same as ``dymu bench e2e_llava``: the benchmark is
:mod:`dymu.bench.e2e_llava` (``--help`` says what it measures and how).
"""

from dymu.bench.e2e_llava import format_results, main, parse_args, run  # noqa: F401 (its old import path)

if __name__ == "__main__":
    raise SystemExit(main())
