"""The benchmarks behind ``dymu bench NAME`` (and ``python -m bench.NAME`` in a checkout): each one builds
random-weight models of the real shapes (no downloads) or the small real VLM, and prints the ratios that matter side
by side from one run, with medians after warm-up, peak memory and its performance targets (PASS/MISS, not asserted).

One module per benchmark (``parse_args``, ``run`` -> a dict of figures, ``format_results``, ``main``) over the
shared machinery: :mod:`~dymu.bench.timing`, :mod:`~dymu.bench.memory`, :mod:`~dymu.bench.report`,
:mod:`~dymu.bench.options` and :mod:`~dymu.bench.towers`. Figures and how to read them: docs/performance.md.
"""

from __future__ import annotations

#: ``dymu bench NAME``: the benchmark modules of this package, by name
BENCHMARKS = ("e2e_llava", "e2e_small_vlm", "encoder", "onevision_crops", "qwen_tower", "vtu_prefill")
