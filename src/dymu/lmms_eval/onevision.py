"""``--model dymu_llava_onevision``: LLaVA-OneVision with DyMU as an lmms-eval backend.

The ``dymu_llava`` backend (:class:`dymu.lmms_eval.llava.DyMULlava`) with OneVision's loader
(:func:`dymu.vlm.load_onevision`: a llava-hf OneVision checkpoint, its ``dymu`` config block honoured, DyMU by
:func:`dymu.vlm.onevision.enable_dymu_onevision`). The ``--model_args`` are ``dymu_llava``'s (see
:mod:`dymu.lmms_eval.llava`), except:

=====================  ======================================================================================
``pretrained``         llava-hf LLaVA-OneVision folder (``model_type`` ``llava_onevision``) or hub name, e.g.
                       ``llava-hf/llava-onevision-qwen2-7b-si-hf``
``token_order``        default ``batch`` (the authors' OneVision code merges the crops of a call as one batch;
                       counts do not depend on the batch)
``token_budget``       target mean tokens *per crop* (the ``K`` of ``siglip-so400m-patch14-384-<K>out``)
``downsample``         ``nearest`` (default) / ``error``: images the stock model downsamples past ``anyres_max_N``
``vision_tower``       not accepted (OneVision checkpoints hold their tower)
=====================  ======================================================================================

Each prompt's images go to the processor as that prompt's list (OneVision lays out a lone image with its anyres
tiles, the images of a multi-image prompt as base crops only). Visual token counts are per image, as the LLM
receives them (merged tokens + row newlines; for ``dymu=false`` the stock count, which depends on the image size).
Video is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dymu import evaluation
from dymu.evaluation import Prompt
from dymu.lmms_eval.llava import DyMULlava, loud_failure
from dymu.vlm.base import dymu_vtu_mode
from dymu.vlm.onevision import VIDEO_MESSAGE

NAME = "dymu_llava_onevision"


class PerPromptImages:
    """A OneVision processor that takes the flat image list of a batch (dymu's evaluation code calls processors as
    LLaVA-1.5's) and hands it over as one list per prompt, by the image tokens in each prompt's text. It keeps the
    last call's output (``last_inputs``); everything else is the wrapped processor's."""

    def __init__(self, processor: Any) -> None:
        self.__dict__["processor"] = processor
        self.__dict__["last_inputs"] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["processor"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["processor"], name, value)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        processor = self.__dict__["processor"]
        if images is not None and isinstance(text, (list, tuple)):
            images, token = list(images), processor.image_token
            counts = [t.count(token) for t in text]
            if sum(counts) != len(images):
                raise ValueError(f"{NAME}: {len(images)} images for {sum(counts)} {token} tokens in the prompts")
            nested, start = [], 0
            for n in counts:
                nested.append(images[start : start + n])
                start += n
            images = nested if any(nested) else None
        out = processor(images=images, text=text, **kwargs)
        self.__dict__["last_inputs"] = out
        return out


class DyMULlavaOneVision(DyMULlava):
    """LLaVA-OneVision + DyMU for lmms-eval's simple (``doc_to_visual``) tasks; see the module docstring."""

    backend_name = NAME
    accepted_args = (
        "pretrained, thresholds, vtu, threshold_offset, token_budget, budget_images, calibration_images, token_order, "
        "dymu, downsample, batch_size, device, dtype, max_new_tokens, tokens_path, loglikelihood_output, "
        "prompt_suffix"
    )
    budget_unit = "per crop"

    @loud_failure
    def __init__(self, downsample: str | None = None, token_order: str | None = "batch", **kwargs: Any) -> None:
        if downsample not in (None, "", "nearest", "error"):
            raise ValueError(f"{NAME}: downsample={downsample!r}; expected nearest or error")
        if kwargs.get("vision_tower") not in (None, ""):
            raise ValueError(f"{NAME}: vision_tower is for original LLaVA-1.5 checkpoints; OneVision holds its tower")
        self._downsample = downsample or None
        super().__init__(token_order=token_order, **kwargs)
        from dymu.vlm.base import enabled

        on = enabled(self._model)
        self.settings["downsample"] = on.options["downsample"] if on is not None else None  # the block's, or given

    # ------------------------------------------------------------------------------------------ hooks
    def _load(self, path: Path, *, vision_tower: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        from dymu.vlm import load_onevision
        from dymu.vlm.loading import is_onevision, is_original_onevision, read_config

        config = read_config(path)
        if not is_onevision(config) and not is_original_onevision(config):
            raise ValueError(
                f"{path} is not a LLaVA-OneVision checkpoint (model_type {config.get('model_type')!r}): "
                "for LLaVA-1.5 use --model dymu_llava"
            )
        model, processor = load_onevision(path, downsample=self._downsample, **kwargs)
        return model, PerPromptImages(processor)

    def _calibrate_offset(self, images: list[Any], target: float) -> float:
        from dymu.vlm.onevision import calibrate_token_budget

        return calibrate_token_budget(self._model, self.processor, images, target)

    def _full_tokens_per_image(self) -> int | None:
        return None  # the stock count depends on each image's size (anyres)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: Any) -> list[Any]:
        from PIL import Image

        from dymu.lmms_eval.llava import _flatten

        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        for v in visuals:
            if not isinstance(v, Image.Image):
                kind = "video" if isinstance(v, (str, Path)) or "video" in type(v).__name__.lower() else "non-image"
                raise ValueError(
                    f"{NAME}: task {task!r} document {doc_id} gave a {kind} visual ({type(v).__name__}); "
                    f"{NAME} evaluates images only: {VIDEO_MESSAGE}"
                )
        return visuals

    def _stock_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """The stock model's per-image counts of the last processor call, laid out like ``rows``."""
        from dymu.vlm.onevision import stock_visual_tokens

        last = self.processor.last_inputs
        if not any(rows) or last is None or "image_sizes" not in last:
            return rows
        flat = stock_visual_tokens(self._model, last["image_sizes"], last.get("batch_num_images"))
        out, start = [], 0
        for r in rows:
            out.append(flat[start : start + len(r)])
            start += len(r)
        return out

    def _stock_counts(self, results: list[Any]) -> list[Any]:
        """``evaluation`` counts a stock model's images as LLaVA-1.5's fixed count; give OneVision's instead."""
        if dymu_vtu_mode(self._model) is not None:
            return results
        rows = self._stock_rows([r.visual_tokens for r in results])
        fixed = []
        for r, counts in zip(results, rows):
            change = {"visual_tokens": counts}
            if hasattr(r, "input_tokens"):
                change["input_tokens"] = r.input_tokens - sum(r.visual_tokens) + sum(counts)
            fixed.append(replace(r, **change))
        return fixed

    def _generate(self, prompts: list[Prompt], settings: dict[str, Any]) -> list[evaluation.Generation]:
        return self._stock_counts(super()._generate(prompts, settings))

    def _loglikelihoods(self, prompts: list[Prompt], continuations: list[str]) -> list[evaluation.LogLikelihood]:
        return self._stock_counts(super()._loglikelihoods(prompts, continuations))
