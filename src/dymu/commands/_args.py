"""Shared argument types and checks of the ``dymu`` sub-commands (not a command: the name starts with ``_``).

The CLI builds every parser for ``dymu --help``, so nothing here imports transformers at module level: the
loaders (:mod:`dymu.vlm`, seconds to import) are imported where a command loads a model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from dymu.baselines import METHODS
from dymu.hub import hub_file, is_hub_name
from dymu.merge import TOKEN_ORDERS

SCHEDULES = ("constant", "linear", "reverse_linear")
"""Merge schedules, as every command spells them (``reverse-linear`` is accepted too)."""


def int_at_least(minimum: int, why: str = ""):
    """An argparse ``type``: an int >= ``minimum`` (the message says what was expected, and ``why``)."""
    reason = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{reason}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{reason}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def schedule(text: str) -> str:
    """``reverse-linear`` -> ``reverse_linear`` (argparse then checks it against :data:`SCHEDULES`)."""
    return text.strip().replace("-", "_")


def add_schedule_argument(parser: argparse.ArgumentParser, *, default: str | None, help: str) -> None:
    parser.add_argument(
        "--schedule", type=schedule, choices=SCHEDULES, default=default,
        help=f"{help}; reverse-linear is accepted for reverse_linear",
    )


def check_writable_file(path: str | Path, what: str = "output") -> Path:
    """Refuse, before any work is done, an output file that cannot be created: a parent that is a file, or a
    folder without write access (``os.access``). Missing folders are fine where they could be created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {what} {path}: it is a directory; give a file name")
    parent = path.parent
    while not parent.exists():  # the first existing ancestor decides whether the folders can be made
        if parent.is_symlink():  # a dangling link
            raise ValueError(f"cannot write {what} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {path}: {parent} is not writable (give another folder)")
    return path


def add_token_order_argument(parser: argparse.ArgumentParser, *, default: str | None, help: str) -> None:
    """``--token-order``: the DToMe token order after a merge (see :mod:`dymu.merge`)."""
    parser.add_argument(
        "--token-order", choices=TOKEN_ORDERS, default=default,
        help=f"{help}. authors: exactly the original code (a lone image takes its single-image path); batch / "
        "single: one of its two paths for every batch (batch-invariant); raster: merged tokens at their first "
        "patch (dymu 0.1)",
    )


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """``--method``: DyMU or one of the baselines of :mod:`dymu.baselines` (with ``--token-budget`` K)."""
    parser.add_argument(
        "--method", choices=METHODS, default="dymu",
        help="dymu (default), or a baseline keeping --token-budget tokens per image: tome (fixed-count ToMe), "
        "prune (CLS-attention pruning), random (random dropping)",
    )


def method_settings(args: argparse.Namespace) -> dict:
    """``method``/``token_budget`` for the loaders: a baseline's budget is a whole number of tokens per image."""
    method = getattr(args, "method", "dymu")
    if method == "dymu":
        return {}
    budget = getattr(args, "token_budget", None)
    if budget is None or budget != int(budget) or budget < 1:
        raise ValueError(f"--method {method} needs --token-budget K, a positive whole number of tokens, got {budget}")
    if args.thresholds is not None:
        raise ValueError(f"--method {method} takes no --thresholds (they are DyMU's)")
    return {"method": method, "token_budget": int(budget)}


def _load_from_args(load: Callable[..., tuple[Any, Any]], args: argparse.Namespace, model: str | None,
                    **family_options: Any):
    """``load`` with the options ``generate`` and ``eval`` share, moved to ``--device``."""
    loaded, processor = load(
        model or args.model,
        thresholds=args.thresholds,
        vtu=args.vtu,
        threshold_offset=args.threshold_offset,
        torch_dtype=getattr(torch, args.dtype),
        dymu=False if args.no_dymu else None,
        **family_options,
        **method_settings(args),
    )
    return loaded.to(args.device), processor


def load_llava_from_args(args: argparse.Namespace, model: str | None = None):
    """``dymu.vlm.load_llava`` with the options ``generate`` and ``eval`` share (``--thresholds``, ``--vtu``,
    ``--threshold-offset``, ``--vision-tower``, ``--dtype``, ``--no-dymu``), moved to ``--device``."""
    from dymu.vlm import load_llava  # heavy (module docstring)

    return _load_from_args(load_llava, args, model, vision_tower=args.vision_tower)


def load_vlm_from_args(args: argparse.Namespace, model: str | None = None):
    """``dymu.vlm.load`` (LLaVA-1.5 or LLaVA-OneVision, by the checkpoint's config.json) with the options of
    :func:`load_llava_from_args`, plus ``--downsample`` where the command has it; moved to ``--device``."""
    from dymu.vlm import load  # heavy (module docstring)

    return _load_from_args(load, args, model, vision_tower=getattr(args, "vision_tower", None),
                           downsample=getattr(args, "downsample", None))


def checkpoint_model_type(path: str) -> str | None:
    """``model_type`` of a checkpoint folder's or hub repository's config.json (None for anything else, or where
    the repository cannot be had: the loader then says why)."""
    config = Path(path) / "config.json"
    if is_hub_name(path):
        try:
            config = hub_file(path, "config.json", what=path, local_hint="")
        except FileNotFoundError:
            return None
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError):
        return None
