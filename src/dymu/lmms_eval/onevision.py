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
``token_budget``       target mean tokens *per crop* (the ``K`` of ``siglip-so400m-patch14-384-<K>out``);
                       ``method=tome``: exactly that many per crop (``prune``/``random``: LLaVA-1.5 only)
``downsample``         ``nearest`` (default) / ``error``: images the stock model downsamples past ``anyres_max_N``
``vision_tower``       not accepted (OneVision checkpoints hold their tower)
=====================  ======================================================================================

Each prompt's images go to the processor as that prompt's list (OneVision lays out a lone image with its anyres
tiles, the images of a multi-image prompt as base crops only). Visual token counts are per image, as the LLM
receives them (merged tokens + row newlines; for ``dymu=false`` the stock count, which depends on the image size).
Video is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dymu.lmms_eval.arguments import loud_failure
from dymu.lmms_eval.llava import DyMULlava
from dymu.vlm import load_onevision
from dymu.vlm.base import vlm_state
from dymu.vlm.loading import is_onevision, is_original_onevision, read_config
from dymu.vlm.onevision import VIDEO_MESSAGE

NAME = "dymu_llava_onevision"


class PerPromptImages:
    """A OneVision processor that takes the flat image list of a batch (dymu's evaluation code calls processors as
    LLaVA-1.5's) and hands it over as one list per prompt, by the image tokens in each prompt's text; everything else is the wrapped processor's."""

    def __init__(self, processor: Any) -> None:
        self.__dict__["processor"] = processor

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
        return processor(images=images, text=text, **kwargs)


class DyMULlavaOneVision(DyMULlava):
    """LLaVA-OneVision + DyMU for lmms-eval's simple (``doc_to_visual``) tasks; see the module docstring."""

    backend_name = NAME
    accepted_args = (
        "pretrained, method, thresholds, vtu, threshold_offset, token_budget, budget_images, calibration_images, "
        "token_order, dymu, downsample, batch_size, device, dtype, max_new_tokens, tokens_path, loglikelihood_output, "
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
        on = vlm_state(self._model)
        self.settings["downsample"] = on.options["downsample"] if on is not None else None  # the block's, or given

    # ------------------------------------------------------------------------------------------ hooks
    def _load(self, path: Path, *, vision_tower: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        config = read_config(path)
        if not is_onevision(config) and not is_original_onevision(config):
            raise ValueError(
                f"{path} is not a LLaVA-OneVision checkpoint (model_type {config.get('model_type')!r}): "
                "for LLaVA-1.5 use --model dymu_llava"
            )
        model, processor = load_onevision(path, downsample=self._downsample, **kwargs)
        return model, PerPromptImages(processor)

    def _full_tokens_per_image(self) -> int | None:
        return None  # the stock count depends on each image's size (anyres)

    def _not_an_image(self, visual: Any, task: str, doc_id: Any) -> str:
        kind = "video" if isinstance(visual, (str, Path)) or "video" in type(visual).__name__.lower() else "non-image"
        return (f"{NAME}: task {task!r} document {doc_id} gave a {kind} visual ({type(visual).__name__}); "
                f"{NAME} evaluates images only: {VIDEO_MESSAGE}")
