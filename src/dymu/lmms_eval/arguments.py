"""``--model_args`` of the dymu lmms-eval backends, checked and typed (their meaning: :mod:`dymu.lmms_eval.llava`),
and how a failed construction is reported."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dymu import evaluation
from dymu.baselines import METHODS
from dymu.distributed import Launch, launch_from_env
from dymu.encoders import resolve_thresholds_path
from dymu.vtu import VTU_MODES

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class ModelArgs:
    """The ``--model_args`` as lmms-eval passes them (its parser turns ``1`` into an int, ``true`` into a bool)."""

    pretrained: str | None = None
    method: str = "dymu"
    thresholds: Any = None
    vtu: str | None = None
    threshold_offset: float | None = None
    token_budget: float | None = None
    budget_images: str | None = None
    calibration_images: int = 32
    token_order: str | None = None
    dymu: bool | None = None
    vision_tower: str | None = None
    batch_size: int | str = 1
    max_batch_size: int | None = None  # lmms-eval passes its --max_batch_size; unused
    device: str | None = None
    dtype: str | None = None
    max_new_tokens: int = 1024
    tokens_path: str | None = None
    loglikelihood_output: str = "logprob"
    prompt_suffix: str | None = None


@dataclass
class BackendSettings:
    """What a backend is built from: the checked model args, with paths resolved from the start folder."""

    given: ModelArgs
    path: Path  # the checkpoint folder
    thresholds: list[float] | str | None  # values, or an absolute checkpoint path
    token_budget: float | int | None
    batch_size: int
    device: torch.device
    torch_dtype: torch.dtype | str
    launch: Launch
    tokens_path: Path | None
    prompt_suffix: str | None  # as given (a written backslash-n made a newline); None: the checkpoint's
    baseline: dict[str, Any] = field(default_factory=dict)  # method and token_budget of a baseline method

    def load_kwargs(self) -> dict[str, Any]:
        """:func:`dymu.vlm.load_llava`'s keywords (a family's loader takes the same)."""
        given = self.given
        return dict(thresholds=self.thresholds, vtu=given.vtu, threshold_offset=given.threshold_offset,
                    vision_tower=given.vision_tower, torch_dtype=self.torch_dtype, dymu=given.dymu, **self.baseline)

    def record(self) -> dict[str, Any]:
        """The settings as the token record shows them (the backend adds what loading decides)."""
        given = self.given
        return {
            "pretrained": str(given.pretrained),
            "thresholds": self.thresholds,
            "vtu": given.vtu,
            "threshold_offset": given.threshold_offset,
            "token_budget": self.token_budget,
            "method": given.method,
            "dymu": given.dymu,
            "dtype": str(given.dtype or self.torch_dtype).replace("torch.", ""),
            "batch_size": self.batch_size,
        }


def parse_threshold_arg(value: Any, name: str) -> list[float] | str | None:
    """``thresholds=``: None, a list of floats (from ``[0.1,0.2]``), or a DyMU name / checkpoint path (checked to
    exist, made absolute)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: thresholds={text!r} is not a list of numbers: {err}") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{name}: thresholds={text!r} is not a list of numbers")
        return [float(v) for v in values]
    try:  # now, relative to the folder lmms-eval was started in (the error names the absolute path tried)
        return str(resolve_thresholds_path(text).absolute())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {err}") from None


def parse_model_args(name: str, accepted: str, model_args: dict[str, Any]) -> BackendSettings:
    """Check ``model_args`` for backend ``name`` (``accepted``: the names it takes, for the message)."""
    known = {f.name for f in fields(ModelArgs)}
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise ValueError(f"{name}: unknown model_args {unknown}; accepted: {accepted}")
    given = ModelArgs(**model_args)
    if given.vtu is not None and given.vtu not in VTU_MODES:
        raise ValueError(f"{name}: vtu={given.vtu!r}; expected fast, exact or off")
    if given.loglikelihood_output not in ("logprob", "loss"):
        raise ValueError(f"{name}: loglikelihood_output={given.loglikelihood_output!r}; expected logprob or loss")
    if given.method not in METHODS:
        raise ValueError(f"{name}: method={given.method!r}; expected {', '.join(METHODS)}")
    token_budget, baseline = given.token_budget, {}
    if given.method != "dymu":
        if token_budget is None or float(token_budget) != int(token_budget) or int(token_budget) < 1:
            raise ValueError(f"{name}: method={given.method} needs token_budget=K, a positive whole "
                             f"number of tokens, got {token_budget!r}")
        token_budget = int(token_budget)
        baseline = {"method": given.method, "token_budget": token_budget}
    if token_budget is not None and given.threshold_offset is not None:
        raise ValueError(f"{name}: give token_budget or threshold_offset, not both (the budget sets the offset)")
    if isinstance(given.prompt_suffix, bool):  # lmms-eval reads "true"/"false" as booleans
        raise ValueError(f"{name}: prompt_suffix={given.prompt_suffix!r}; expected the text to append")
    try:
        batch_size = int(given.batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: batch_size={given.batch_size!r}; expected a positive integer ('auto' is not "
                         "supported)") from None
    if batch_size < 1:
        raise ValueError(f"{name}: batch_size must be >= 1, got {given.batch_size}")
    launch = launch_from_env()  # accelerate launch / torchrun; lmms-eval shards the requests by RANK itself
    device, torch_dtype = _placement(name, given.device, given.dtype, launch)
    try:
        path = evaluation.resolve_pretrained(given.pretrained)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None
    suffix = given.prompt_suffix
    return BackendSettings(
        given=given,
        path=path,
        thresholds=parse_threshold_arg(given.thresholds, name),
        token_budget=token_budget,
        batch_size=batch_size,
        device=device,
        torch_dtype=torch_dtype,
        launch=launch,
        tokens_path=Path(given.tokens_path).absolute() if given.tokens_path else None,
        prompt_suffix=None if suffix is None else str(suffix).replace("\\n", "\n"),  # lmms-eval parses 1 as int
        baseline=baseline,
    )


def _placement(name: str, device: str | None, dtype: str | None, launch: Launch) -> tuple[torch.device, Any]:
    """The device (each process its own GPU) and the dtype (float16 on GPU, float32 on CPU unless given)."""
    device = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if launch.world_size > 1 and device == "cuda":
        device = f"cuda:{launch.local_rank}"
    where = torch.device(device)
    if dtype in (None, ""):
        return where, torch.float16 if where.type == "cuda" else torch.float32
    if str(dtype) == "auto":
        return where, "auto"
    if str(dtype) in DTYPES:
        return where, DTYPES[str(dtype)]
    raise ValueError(f"{name}: dtype={dtype!r}; expected float16, bfloat16, float32 or auto")


def loud_failure(init: Callable[..., None]) -> Callable[..., None]:
    """Make a failed construction impossible to miss: lmms-eval 0.7.3 catches it, logs one line among many and
    exits with status 0 (``--verbosity DEBUG``: re-raised, status 1). So print it framed on stderr too, once."""

    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except Exception as err:
            if not getattr(err, "_dymu_reported", False):
                name = self.backend_name
                message = str(err) if str(err).startswith(name) else f"{name}: {err}"
                rule = "=" * 100
                print(
                    f"\n{rule}\n{name}: THE MODEL COULD NOT BE BUILT - nothing is evaluated, no results are written\n"
                    f"{type(err).__name__}: {message}\n(lmms-eval logs this and still exits with status 0; with "
                    f"--verbosity DEBUG it exits with status 1)\n{rule}",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    err._dymu_reported = True  # type: ignore[attr-defined]
                except AttributeError:
                    pass
            raise

    return wrapped
