"""DyMU for whole VLMs on transformers' own classes: one path (:mod:`dymu.vlm.base`) and one adapter per family,
LLaVA-1.5 (:mod:`dymu.vlm.llava`), LLaVA-OneVision (:mod:`dymu.vlm.onevision`) and Qwen2-VL / Qwen2.5-VL / Qwen3-VL
(:mod:`dymu.vlm.qwen_vl`)."""

from dymu.vlm.base import VisualTokens, dymu_vtu_mode, generate_with_counts, vlm_state
from dymu.vlm.llava import Answer, answer, disable_dymu, enable_dymu
from dymu.vlm.loading import convert_original_llava, load, load_llava, load_onevision, load_qwen
from dymu.vlm.onevision import disable_dymu_onevision, enable_dymu_onevision
from dymu.vlm.qwen_vl import disable_dymu_qwen, enable_dymu_qwen
from dymu.vlm.settings import prompt_suffix

__all__ = [
    "Answer",
    "answer",
    "enable_dymu",
    "disable_dymu",
    "load",
    "load_llava",
    "load_onevision",
    "convert_original_llava",
    "enable_dymu_onevision",
    "disable_dymu_onevision",
    "load_qwen",
    "enable_dymu_qwen",
    "disable_dymu_qwen",
    "dymu_vtu_mode",
    "prompt_suffix",
    "vlm_state",
    "generate_with_counts",
    "VisualTokens",
]
