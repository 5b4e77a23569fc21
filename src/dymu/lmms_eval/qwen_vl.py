"""``--model dymu_qwen_vl``: Qwen2-VL / Qwen2.5-VL / Qwen3-VL with DyMU as an lmms-eval backend.

The ``dymu_llava`` backend (:class:`dymu.lmms_eval.llava.DyMULlava`) with the Qwen loader
(:func:`dymu.vlm.load_qwen`: a Qwen-VL checkpoint, its ``dymu`` config block honoured, DyMU by
:func:`dymu.vlm.qwen_vl.enable_dymu_qwen`). The ``--model_args`` are ``dymu_llava``'s, except:

=====================  ======================================================================================
``pretrained``         a Qwen-VL folder or hub name (``model_type`` ``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``),
                       e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``
``token_budget``       ``method=tome|prune|random``: tokens per image; with ``method=dymu`` refused (the
                       towers take any resolution: use thresholds found for the target, docs/qwen_vl.md)
``vision_tower``       not accepted (the checkpoint holds its tower)
=====================  ======================================================================================

Visual token counts are per image, as the LLM receives them (for ``dymu=false`` the stock count, which depends on
the image size). Video is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dymu
from dymu.lmms_eval.arguments import loud_failure
from dymu.lmms_eval.llava import DyMULlava
from dymu.vlm import load_qwen
from dymu.vlm.base import vlm_state
from dymu.vlm.loading import read_config
from dymu.vlm.qwen_vl import MODEL_CLASSES

NAME = "dymu_qwen_vl"


class DyMUQwenVL(DyMULlava):
    """Qwen-VL + DyMU for lmms-eval's simple (``doc_to_visual``) tasks; see the module docstring."""

    backend_name = NAME
    accepted_args = (
        "pretrained, method, thresholds, vtu, threshold_offset, token_budget, dymu, batch_size, device, dtype, "
        "max_new_tokens, tokens_path, loglikelihood_output, prompt_suffix"
    )

    @loud_failure
    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("vision_tower") not in (None, ""):
            raise ValueError(f"{NAME}: vision_tower is for original LLaVA-1.5 checkpoints; Qwen-VL holds its tower")
        if kwargs.get("token_budget") not in (None, "") and kwargs.get("method", "dymu") == "dymu":
            raise ValueError(f"{NAME}: token_budget with method=dymu is not available for Qwen-VL (dynamic "
                             "resolution); give thresholds, or method=tome|prune|random with token_budget")
        super().__init__(**kwargs)

    def _load(self, path: Path, *, vision_tower: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        model_type = read_config(path).get("model_type")
        if model_type not in MODEL_CLASSES:
            raise ValueError(f"{path} is not a Qwen-VL checkpoint (model_type {model_type!r}): for LLaVA-1.5 use "
                             "--model dymu_llava, for LLaVA-OneVision dymu_llava_onevision")
        return load_qwen(path, **kwargs)

    def _merging_on(self) -> bool:
        state = vlm_state(self._model)
        if state is None:
            return False
        return state.method != "dymu" or dymu.get_state(self._model.model.visual).mode == "infer"

    def _full_tokens_per_image(self) -> int | None:
        return None  # the stock count depends on each image's size
