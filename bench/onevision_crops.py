"""LLaVA-OneVision crops of mixed complexity through the DToMe SigLIP tower: padded batch vs one call per crop.

``python -m bench.onevision_crops`` from the repository root, the same as ``dymu bench onevision_crops``: the benchmark is
:mod:`dymu.bench.onevision_crops` (``--help`` says what it measures and how).
"""

from dymu.bench.onevision_crops import format_results, main, parse_args, run  # noqa: F401 (its old import path)

if __name__ == "__main__":
    raise SystemExit(main())
