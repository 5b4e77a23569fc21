"""transformers API differences dymu has to bridge (one place, so they are easy to drop later).

The KV cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache`` in model
``forward`` signatures and in model/``generate`` outputs. The old names still work there but warn
(``FutureWarning`` for the forward keyword, a log warning for output attributes) and go away in 5.40;
before 5.24 only the old names exist. :func:`cache_kwarg` and :func:`output_cache` pick the name the
installed version uses.
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from packaging.version import Version
from torch import nn

__all__ = ["CACHE_NAMES", "cache_kwarg", "output_cache"]

#: Names of the KV-cache argument/output field, newest first.
CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values")


def _transformers_default() -> str:
    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """Keyword under which ``model.forward`` takes the KV cache: ``"cache"`` (5.24+) or ``"past_key_values"``.

    Read from the signature of the first ``forward`` in the class hierarchy that names either (a
    subclass whose ``forward`` only takes ``**kwargs`` is looked through); from the installed
    transformers version when none does.
    """
    for cls in type(model).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        try:
            params = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            continue
        for name in CACHE_NAMES:
            if name in params:
                return name
    return _transformers_default()


def output_cache(output: Any) -> Any:
    """The KV cache held by a model or ``generate`` output (``None`` if it holds none), without BC warnings."""
    keys = output.keys()
    for name in CACHE_NAMES:
        if name in keys:
            return output[name]
    return None
