"""lmms-eval requests into dymu calls and back: the visuals of a document, generation settings, batches, and the
log-likelihood result type lmms-eval's evaluator reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance


class LoglikelihoodPair(tuple, GenerationResult):
    """``(logprob, is_greedy)``, as lmms-eval's ``loglikelihood`` contract asks.

    lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``, which turns
    anything but a ``str`` / ``GenerationResult`` into its ``str()`` — a plain tuple would reach the task's
    ``process_results`` as the text ``"(-3.2, False)"``. This pair is both: a tuple for callers, and a
    ``GenerationResult`` whose ``text`` is the plain tuple for the evaluator.
    """

    def __new__(cls, logprob: float, is_greedy: bool):
        return tuple.__new__(cls, (float(logprob), bool(is_greedy)))

    def __init__(self, logprob: float, is_greedy: bool) -> None:
        self.text = (float(logprob), bool(is_greedy))
        self.token_counts = None


def flatten_visuals(visuals: Any) -> list[Any]:
    """A task's ``doc_to_visual`` output (one visual, a list, nested lists or None) as a flat list."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(flatten_visuals(v))
    return out


def first_images(task_docs: Any, doc_to_visual: Callable[[Any], Any], count: int) -> list[Any]:
    """The visuals of the first documents of a task split, ``count`` at most (budget calibration)."""
    images: list[Any] = []
    for i in range(len(task_docs)):
        images.extend(flatten_visuals(doc_to_visual(task_docs[i])))
        if len(images) >= count:
            break
    return images[:count]


def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int, name: str) -> dict[str, Any]:
    """A task's ``gen_kwargs`` as :func:`dymu.evaluation.generate`'s keywords (greedy unless a temperature > 0)."""
    gk = dict(gen_kwargs or {})
    until = gk.get("until") or []
    if isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"{name}: gen_kwargs['until'] must be a string or a list, got {type(until).__name__}")
    temperature = float(gk.get("temperature") or 0.0)
    do_sample = bool(gk["do_sample"]) if "do_sample" in gk else temperature > 0
    if temperature <= 0:
        do_sample = False
    return {
        "until": list(until),
        "max_new_tokens": int(gk.get("max_new_tokens") or default_max_new_tokens),
        "do_sample": do_sample,
        "temperature": temperature if do_sample else None,
        "top_p": gk.get("top_p") if do_sample else None,
        "num_beams": int(gk.get("num_beams") or 1),
    }


def same_generation_settings(args: tuple) -> str:
    """Batching key of a ``generate_until`` request: its ``gen_kwargs``."""
    return json.dumps(args[1], sort_keys=True, default=str)


def batches(requests: list[Instance], batch_size: int, key: Callable[[tuple], str] = lambda args: "") -> list[list[int]]:
    """Request indices in batches of ``batch_size``: grouped by ``key`` of the request's args (e.g. generation
    settings), longest context first within a group."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(key(r.args), []).append(i)
    out = []
    for idx in groups.values():
        idx.sort(key=lambda i: -len(requests[i].args[0]))
        out += [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    return out
