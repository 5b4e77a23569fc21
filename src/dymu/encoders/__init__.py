"""Patch stock vision encoders with DToMe: ``dymu.patch(model, thresholds=…)`` / ``dymu.unpatch(model)``.

Adapters (one thin module per family) are tried in order; each returns a
:class:`~dymu.encoders.base.DToMeState` when it recognises the model:

* :mod:`dymu.encoders.hf` — transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (or a model holding one);
* :mod:`dymu.encoders.open_clip` — open_clip ``VisionTransformer`` (``ViT-L-14-336`` …);
* :mod:`dymu.encoders.timm_vit` — timm ``VisionTransformer`` (open_clip's SigLIP towers).
* :mod:`dymu.encoders.hf_dinov2` — transformers ``Dinov2Model`` (any input size; CLS protected).

:func:`dymu.encode` runs a patched encoder and returns an :class:`Encoding` (per-image features of one layer,
sizes, source maps, tokens per layer); :func:`dymu.calibrate_budget` sets the threshold offset that meets an
average token budget.
"""

from __future__ import annotations

from dymu.encoders.base import DToMeRun, DToMeState
from dymu.encoders.encoding import BudgetCalibration, Encoding, calibrate_budget, encode
from dymu.encoders.names import DyMUName, parse_dymu_name
from dymu.encoders.patching import (
    ADAPTERS,
    ThresholdsLike,
    configure,
    get_state,
    inspect_encoder,
    last_run,
    patch,
    resolve_thresholds_path,
    unpatch,
)

__all__ = [
    "patch",
    "unpatch",
    "configure",
    "get_state",
    "last_run",
    "encode",
    "calibrate_budget",
    "resolve_thresholds_path",
    "inspect_encoder",
    "Encoding",
    "BudgetCalibration",
    "DToMeState",
    "DToMeRun",
    "DyMUName",
    "parse_dymu_name",
    "ADAPTERS",
    "ThresholdsLike",
]
