"""DToMe encoder cost: a CLIP ViT-L/14-336-shaped vision tower at 72out/192out/384out vs no merging.

``python -m bench.encoder`` from the repository root, the same as ``dymu bench encoder``: the benchmark is
:mod:`dymu.bench.encoder` (``--help`` says what it measures and how).
"""

from dymu.bench.encoder import format_results, main, parse_args, run  # noqa: F401 (its old import path)

if __name__ == "__main__":
    raise SystemExit(main())
