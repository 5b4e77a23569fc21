"""lmms-eval model plugin: ``--model dymu_llava`` (LLaVA-1.5 + DyMU), ``dymu_llava_onevision`` (LLaVA-OneVision + DyMU)
and ``dymu_qwen_vl`` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL + DyMU).

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (``pip install 'dymu[eval]'``), so
``python -m lmms_eval --model dymu_llava --model_args pretrained=DIR,thresholds=ViT-L-14-336-tome-72out ...`` works
without touching lmms-eval. See docs/evaluation.md for the model arguments and where the visual token statistics go.

This module stays importable without lmms-eval (the entry point loads it while lmms-eval builds its registry);
the model classes live in :mod:`dymu.lmms_eval.llava`, :mod:`dymu.lmms_eval.onevision` and :mod:`dymu.lmms_eval.qwen_vl`
(model args: :mod:`~dymu.lmms_eval.arguments`, requests: :mod:`~dymu.lmms_eval.requests`, the visual token record:
:mod:`~dymu.lmms_eval.token_record`).
"""

from __future__ import annotations

MODELS = {
    "dymu_llava": "dymu.lmms_eval.llava.DyMULlava",
    "dymu_llava_onevision": "dymu.lmms_eval.onevision.DyMULlavaOneVision",
    "dymu_qwen_vl": "dymu.lmms_eval.qwen_vl.DyMUQwenVL",
}


def manifests():
    """The entry point's payload: one ``ModelManifest`` per model id (simple, i.e. ``doc_to_visual`` requests)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # here: this module loads without lmms-eval (optional)

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in MODELS.items()]
