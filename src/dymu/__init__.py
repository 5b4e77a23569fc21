"""dymu: training-free DyMU (dynamic token merging + virtual token unmerging) for VLMs.

Core pieces:

* :mod:`dymu.merge` – the DToMe merge algorithm (pure torch); :mod:`dymu.selection` – which tokens merge per mode;
  :mod:`dymu.token_order` – token orders, merge paths and each entry point's default.
* :mod:`dymu.thresholds` – merge schedules, threshold statistics and checkpoints.
* :mod:`dymu.encoders` – ``dymu.patch(model, thresholds=…)`` makes a stock vision encoder merge;
  ``dymu.encode(model, pixel_values, layer=-2)`` returns per-image merged features, sizes and source maps.
* :mod:`dymu.vtu` – virtual token unmerging in RoPE decoders (``enable_vtu``, ``prepare_vtu``, ``vtu_context``).
* :mod:`dymu.vlm` – whole VLMs (LLaVA-1.5, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL / Qwen3-VL): ``load``,
  ``enable_dymu``; one path for every family (:mod:`dymu.vlm.base`); :mod:`dymu.baselines` – ToMe, CLS-attention
  pruning, random dropping (``method=``).
* :mod:`dymu.data` – reading images, image lists for threshold finding, preprocessing transforms;
  :mod:`dymu.visualize` – pictures of the merge groups and complexity vs tokens.
"""

from __future__ import annotations

__version__ = "0.1.0"

from dymu.encoders import (
    BudgetCalibration,
    Encoding,
    calibrate_budget,
    configure,
    encode,
    get_state,
    last_run,
    patch,
    unpatch,
)
from dymu.encoders.names import DyMUName, parse_dymu_name
from dymu.merge import TokenState, dtome_step, size_bias
from dymu.thresholds import (
    RunningThresholds,
    ThresholdCheckpoint,
    import_authors_pth,
    load_thresholds,
    merge_schedule,
    save_thresholds,
)

# dymu.vtu imports transformers (seconds): loaded on first use, so `import dymu` and `dymu --help` stay quick
_VTU_NAMES = ("VTUBatch", "concat_groups", "disable_vtu", "enable_vtu", "prepare_vtu", "vtu_context")


def __getattr__(name: str):
    if name in _VTU_NAMES:
        import dymu.vtu

        value = getattr(dymu.vtu, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dymu' has no attribute {name!r}")


__all__ = [
    "patch",
    "unpatch",
    "configure",
    "get_state",
    "last_run",
    "encode",
    "calibrate_budget",
    "Encoding",
    "BudgetCalibration",
    "DyMUName",
    "parse_dymu_name",
    "TokenState",
    "dtome_step",
    "size_bias",
    "RunningThresholds",
    "ThresholdCheckpoint",
    "import_authors_pth",
    "load_thresholds",
    "merge_schedule",
    "save_thresholds",
    "VTUBatch",
    "concat_groups",
    "enable_vtu",
    "disable_vtu",
    "prepare_vtu",
    "vtu_context",
]
