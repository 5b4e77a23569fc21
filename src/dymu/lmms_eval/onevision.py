"""``--model dymu_llava_onevision``: registered so that the name is known, refused at construction.

dymu does not implement DyMU for LLaVA-OneVision yet (per-crop merging needs its own ``pack_image_features``;
see /work/shared/DESIGN.md, "LLaVA wiring"). The class exists so that lmms-eval reports this clearly instead of
"model not found" or a traceback from deep inside its loader.
"""

from __future__ import annotations

from lmms_eval.api.model import lmms

MESSAGE = (
    "LLaVA-OneVision is not supported by dymu yet: dymu runs DyMU on LLaVA-1.5 only "
    "(use --model dymu_llava with a LLaVA-1.5 checkpoint). OneVision needs per-crop token merging in "
    "pack_image_features, which is not implemented."
)


class DyMULlavaOneVision(lmms):
    is_simple = True

    def __init__(self, **kwargs) -> None:
        raise NotImplementedError(MESSAGE)

    def generate_until(self, requests):  # pragma: no cover - never constructed
        raise NotImplementedError(MESSAGE)

    def loglikelihood(self, requests):  # pragma: no cover
        raise NotImplementedError(MESSAGE)

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError(MESSAGE)
