"""Batched inference that reports each image's visual token count: greedy or sampled generation and
log-likelihoods of continuations, shared by the lmms-eval plugin (:mod:`dymu.lmms_eval`) and ``dymu eval``.

A batch holds prompts whose images keep different numbers of tokens, all in one forward pass (dymu's batched VLM
path, see :mod:`dymu.vlm.base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

import dymu
from dymu.data import load_image
from dymu.evaluation.prompts import Prompt, chat_text
from dymu.prompt_length import check_context


def encode_texts(model: nn.Module, processor: Any, texts: list[str], prompts: Sequence[Prompt]) -> Any:
    """The model's inputs for ``texts`` (already chat-formatted) with the prompts' images: left-padded (for
    generation), on the model's device, pixels in its dtype."""
    images = [load_image(i) for p in prompts for i in p.images]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def chat_inputs(model: nn.Module, processor: Any, prompts: Sequence[Prompt]) -> Any:
    """The model's inputs for a batch of prompts, each in the chat format of :func:`chat_text`."""
    return encode_texts(model, processor, [chat_text(processor, p.text, len(p.images)) for p in prompts], prompts)


def _row_counts(model: nn.Module, prompts: Sequence[Prompt], inputs: Any, out: Any) -> list[list[int]]:
    """Per prompt, the visual tokens each of its images kept in the call that gave ``out`` (its
    ``visual_token_counts``; a stock model: the family's placeholder counts)."""
    from dymu.vlm.base import family_of  # heavy: dymu.vlm pulls transformers; make_table needs none of it

    n_images = sum(len(p.images) for p in prompts)
    counts = getattr(out, "visual_token_counts", None)
    if n_images and counts is None:
        counts = family_of(model).stock_counts(model, inputs)
    counts = list(counts or [])
    if len(counts) != n_images:
        raise RuntimeError(f"{n_images} images in the batch but {len(counts)} visual token counts were reported")
    rows, start = [], 0
    for p in prompts:
        rows.append([int(c) for c in counts[start : start + len(p.images)]])
        start += len(p.images)
    return rows


def _llm_input_tokens(model: nn.Module, inputs: Any, rows: list[list[int]]) -> list[int]:
    """Tokens each prompt puts into the language model: its text plus its images' merged tokens."""
    mask = inputs["attention_mask"].sum(dim=1).tolist()
    ids = inputs["input_ids"]
    placeholders = (ids == model.config.image_token_id).logical_and(inputs["attention_mask"].bool()).sum(dim=1).tolist()
    return [int(m - p + sum(r)) for m, p, r in zip(mask, placeholders, rows)]


def set_token_order(model: nn.Module, token_order: str | None = None) -> str | None:
    """Fix the DToMe token order of a DyMU LLaVA for evaluation; returns the order in effect (None: no DyMU).

    ``None`` picks ``"single"`` where the checkpoint's order is the authors': every image is then merged as the
    authors' code merges a lone image, whatever the batch — so batched runs equal batch-size-1 runs (the authors'
    lmms-eval setting) and a resumed run equals an uninterrupted one. ``"authors"`` keeps their code's batch
    dependence; ``"batch"`` / ``"raster"`` as in :mod:`dymu.merge`.
    """
    from dymu.vlm.base import vision_tower, vlm_state  # heavy: dymu.vlm pulls transformers

    state = vlm_state(model)
    if state is None or state.method not in ("dymu", "tome"):  # no DToMe tower
        return None
    tower = vision_tower(model)
    state = dymu.get_state(tower)
    if token_order is None:
        token_order = "single" if state.token_order == "authors" else state.token_order
    if token_order != state.token_order:
        dymu.configure(tower, token_order=token_order)
    return state.token_order


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class Generation:
    text: str
    visual_tokens: list[int]  # per image of the prompt
    input_tokens: int  # tokens the language model read (merged visual tokens + text)
    output_tokens: int


def cut_at(text: str, until: Iterable[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    stop = len(text)
    for term in until:
        if term and term in text:
            stop = min(stop, text.index(term))
    return text[:stop]


@torch.no_grad()
def generate(
    model: nn.Module,
    processor: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    until: Sequence[str] = (),
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
) -> list[Generation]:
    """Answer a batch of prompts in one ``generate`` call; each answer is cut at the first ``until`` string."""
    if not prompts:
        return []
    tok = processor.tokenizer
    inputs = chat_inputs(model, processor, prompts)
    check_context(model, inputs)
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
        "num_beams": int(num_beams),
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if do_sample:
        kwargs["temperature"] = temperature
        kwargs["top_p"] = top_p
    else:  # greedy: keep the checkpoint's sampling defaults from raising warnings
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**inputs, **kwargs, return_dict_in_generate=True)  # the counts come back with it
    rows = _row_counts(model, prompts, inputs, out)
    n_in = _llm_input_tokens(model, inputs, rows)
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    results = []
    for b in range(len(prompts)):
        ids = new[b].tolist()
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id) + 1]
        text = cut_at(tok.decode(ids, skip_special_tokens=True), until)
        results.append(Generation(text, rows[b], n_in[b], len(ids)))
    return results


# ---------------------------------------------------------------------------------------------- log-likelihood
@dataclass
class LogLikelihood:
    logprob: float  # sum of log-probabilities of the continuation's tokens
    is_greedy: bool  # the continuation is what greedy decoding would produce
    num_tokens: int
    visual_tokens: list[int]


@torch.no_grad()
def loglikelihood(
    model: nn.Module, processor: Any, prompts: Sequence[Prompt], continuations: Sequence[str]
) -> list[LogLikelihood]:
    """Sum of log p(continuation | prompt + images) per prompt, batched in one forward pass.

    The continuation follows the assistant's cue of the chat prompt. As in lm-eval, trailing whitespace of the
    prompt moves to the continuation, and the continuation's tokens are those of prompt+continuation beyond the
    prompt's own tokens.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if not prompts:
        return []
    tok = processor.tokenizer
    full_texts, lengths = [], []
    for p, cont in zip(prompts, continuations):
        context = chat_text(processor, p.text, len(p.images))
        stripped = context.rstrip()
        cont = context[len(stripped) :] + cont
        n_ctx = len(tok(stripped)["input_ids"])
        n_full = len(tok(stripped + cont)["input_ids"])
        if n_full <= n_ctx:
            raise ValueError(f"the continuation {cont!r} adds no tokens to the prompt")
        full_texts.append(stripped + cont)
        lengths.append(n_full - n_ctx)
    inputs = encode_texts(model, processor, full_texts, prompts)
    check_context(model, inputs, new_tokens=0)
    keep = max(lengths) + 1
    out = model(**inputs, logits_to_keep=keep)
    logits = out.logits[:, -keep:].float()
    rows = _row_counts(model, prompts, inputs, out)
    logprobs = torch.log_softmax(logits, dim=-1)
    results = []
    for b, n in enumerate(lengths):
        target = inputs["input_ids"][b, -n:].to(logprobs.device)
        lp = logprobs[b, -n - 1 : -1]
        picked = lp.gather(-1, target[:, None])[:, 0]
        greedy = bool((lp.argmax(dim=-1) == target).all())
        results.append(LogLikelihood(float(picked.sum()), greedy, n, rows[b]))
    return results
