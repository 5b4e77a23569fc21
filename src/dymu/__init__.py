"""dymu: training-free DyMU (dynamic token merging + virtual token unmerging) for VLMs.

Core pieces:

* :mod:`dymu.merge` – the DToMe merge algorithm (pure torch).
* :mod:`dymu.thresholds` – merge schedules, threshold statistics and checkpoints.
* :mod:`dymu.encoders` – ``dymu.patch(model, thresholds=…)`` makes a stock vision encoder merge.
"""

from __future__ import annotations

__version__ = "0.1.0"

from dymu.encoders import configure, get_state, last_run, patch, unpatch
from dymu.merge import TokenState, dtome_step, size_bias
from dymu.thresholds import (
    RunningThresholds,
    ThresholdCheckpoint,
    import_authors_pth,
    load_thresholds,
    merge_schedule,
    save_thresholds,
)

__all__ = [
    "patch",
    "unpatch",
    "configure",
    "get_state",
    "last_run",
    "TokenState",
    "dtome_step",
    "size_bias",
    "RunningThresholds",
    "ThresholdCheckpoint",
    "import_authors_pth",
    "load_thresholds",
    "merge_schedule",
    "save_thresholds",
]
