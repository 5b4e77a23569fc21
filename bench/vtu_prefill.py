"""Prefill cost of VTU vs stock full length vs plain merged tokens, on 7B-shaped decoder layers.

``python -m bench.vtu_prefill`` from the repository root, the same as ``dymu bench vtu_prefill``: the benchmark is
:mod:`dymu.bench.vtu_prefill` (``--help`` says what it measures and how).
"""

from dymu.bench.vtu_prefill import main, parse_args, target_lines  # noqa: F401 (its old import path)

if __name__ == "__main__":
    raise SystemExit(main())
