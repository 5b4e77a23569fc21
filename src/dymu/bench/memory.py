"""Peak memory of one benchmark run, and the bytes a transformers cache holds.

* CUDA: ``torch.cuda.max_memory_allocated`` during one run, minus what was allocated before it;
* CPU: ``tracemalloc`` does not see torch's allocator and ``ru_maxrss`` only ever grows, so the bytes are measured
  explicitly: :class:`PeakTensorBytes` is a ``TorchDispatchMode`` that adds up the storages created by every aten op
  while any tensor viewing them is alive, during one extra untimed run. It counts activations (and caches) created by
  the run, not weights or inputs, and not scratch memory private to a fused kernel (e.g. inside CPU flash attention).
"""

from __future__ import annotations

import platform
import resource
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dymu.bench.timing import sync


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the ``with`` block (CPU or any device).

    A storage is counted from the op that creates it until the last tracked tensor viewing it dies.
    Outputs aliasing an input that was not created inside the block (a weight, the input batch) are
    not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[tuple[str, int], list[int]] = {}  # storage key -> [live tensors, nbytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {self._key(t) for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        try:
            return (str(t.device), t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            return ("", 0)

    def _track(self, t: torch.Tensor, inputs: set) -> None:
        key = self._key(t)
        if key[1] == 0:
            return
        entry = self._refs.get(key)
        if entry is None:
            if key in inputs:  # a view of an untracked tensor (weights, inputs)
                return
            nbytes = t.untyped_storage().nbytes()
            entry = self._refs[key] = [0, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._refs[key]


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Peak bytes allocated by one run of ``fn`` (the module docstring says how, per device)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    tracker = PeakTensorBytes()
    with tracker:
        out = fn()
    return tracker.peak, out


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one run, minus memory allocated before it"
    return "peak live tensor bytes created during one untimed run (dispatch-mode tracker; weights and inputs excluded)"


def maxrss_bytes() -> int:
    """This process's peak resident set size so far (whole run; Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def cache_bytes(cache: Any) -> int:
    """Bytes of keys + values held by a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
