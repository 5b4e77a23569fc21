"""Evaluating LLaVA-1.5 + DyMU: batched generation and log-likelihoods that report each image's visual token count,
answer matching, token statistics, and the quick local evaluation behind ``dymu eval``.

The lmms-eval plugin (:mod:`dymu.lmms_eval`) and ``dymu eval`` share :func:`generate` and :func:`loglikelihood`:
a batch holds prompts whose images keep different numbers of tokens, all in one forward pass (dymu's batched LLaVA
path, see :mod:`dymu.vlm.llava`).

Quick evaluation (:func:`evaluate_questions`) reads a JSON list of ``{"image", "question", "answer"}`` records
(``answer`` a string or a list of accepted strings), writes one JSON line per question, and resumes: a rerun with the
same output continues after the last finished question, and the file then equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from dymu.data import load_image, read_json
from dymu.prompt_length import check_context

# LLaVA-1.5's short-answer instruction (its VQAv2 / GQA / TextVQA prompts)
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def choose_prompt_suffix(model: Any, given: str | None, fallback: str) -> str:
    """The text appended to each question: ``given`` when set (a flag or model_arg wins), else the one the
    checkpoint records (:func:`dymu.vlm.prompt_suffix`: the small VLM's is ""), else ``fallback`` (``dymu eval``:
    LLaVA-1.5's :data:`SHORT_ANSWER`; lmms-eval: "", its tasks add their own instruction)."""
    from dymu.vlm.settings import prompt_suffix

    if given is not None:
        return given
    recorded = prompt_suffix(model)
    return fallback if recorded is None else recorded


def resolve_pretrained(pretrained: Any) -> Path:
    """A local checkpoint folder (made absolute: a later change of folder does not move it), or a hub name's
    snapshot (downloaded, or from the cache with HF_HUB_OFFLINE=1)."""
    if pretrained is None or str(pretrained) == "":
        raise ValueError("pass the checkpoint: pretrained=<LLaVA-1.5 folder or hub name>")
    path = Path(str(pretrained)).expanduser().absolute()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}: expected a llava-hf or original LLaVA-1.5 checkpoint folder")
        return path
    text = str(pretrained)
    from dymu.hub import is_hub_name, unavailable

    if is_hub_name(text):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, ignore_patterns=["*.msgpack", "*.h5", "*.ot", "*.onnx"]))
        except Exception as err:  # offline, unknown repo, ...: say so, without the hub's traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            hint = "or pass the checkpoint's local folder instead"
            raise unavailable(text, f"checkpoint not found: {text!r} is not a folder", hint, f"{type(err).__name__}: {first}") from None
    raise FileNotFoundError(f"checkpoint not found: {path} (expected a LLaVA-1.5 folder or a hub name)")


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One request: the user's text and its images (shown before the text, LLaVA-1.5's layout)."""

    text: str
    images: list[Any] = field(default_factory=list)  # PIL images (or paths)


def image_token(processor: Any) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def ensure_chat_template(processor: Any) -> None:
    """Give a processor without a chat template LLaVA-1.5's conversation format (``vicuna_v1``)."""
    if getattr(processor, "chat_template", None):
        return
    from dymu.vlm.loading import LLAVA_V1_TEMPLATE

    processor.chat_template = LLAVA_V1_TEMPLATE


def chat_text(processor: Any, text: str, num_images: int) -> str:
    """The prompt as the model reads it: one user turn (images, then the text) and the assistant's cue.

    ``<image>`` markers already in ``text`` are dropped (their images go first, as LLaVA-1.5 was trained).
    """
    clean = text.replace(image_token(processor), "").strip() if num_images else text.strip()
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": clean}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _dymu_on(model: nn.Module) -> bool:
    from dymu.vlm.base import dymu_vtu_mode

    return dymu_vtu_mode(model) is not None


def _encode_batch(model: nn.Module, processor: Any, texts: list[str], prompts: Sequence[Prompt]):
    images = [load_image(i) for p in prompts for i in p.images]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _row_counts(model: nn.Module, prompts: Sequence[Prompt], inputs: Any, out: Any) -> list[list[int]]:
    """Per prompt, the visual tokens each of its images kept in the call that gave ``out`` (its
    ``visual_token_counts``; a stock model: the family's placeholder counts)."""
    from dymu.vlm.base import family_of

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
    from dymu.vlm.base import vision_tower, vlm_state

    state = vlm_state(model)
    if state is None or state.method not in ("dymu", "tome"):  # no DToMe tower
        return None
    import dymu

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
    texts = [chat_text(processor, p.text, len(p.images)) for p in prompts]
    inputs = _encode_batch(model, processor, texts, prompts)
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
    inputs = _encode_batch(model, processor, full_texts, prompts)
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


# ---------------------------------------------------------------------------------------------- statistics
def token_stats(counts: Iterable[int]) -> dict[str, float | int]:
    """Count, mean, population std, min and max of visual token counts (one entry per image)."""
    values = [int(c) for c in counts]
    if not values:
        return {"images": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"images": len(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def pooled_stats(parts: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Combine :func:`token_stats` of disjoint sets of images (exact for mean and population std)."""
    parts = [p for p in parts if p and p.get("images")]
    n = sum(int(p["images"]) for p in parts)
    if not n:
        return {"images": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(p["images"] * p["mean"] for p in parts) / n
    second = sum(p["images"] * (p["std"] ** 2 + p["mean"] ** 2) for p in parts) / n
    out: dict[str, Any] = {"images": n, "mean": mean, "std": math.sqrt(max(second - mean**2, 0.0))}
    mins = [p["min"] for p in parts if p.get("min") is not None]
    maxs = [p["max"] for p in parts if p.get("max") is not None]
    out["min"] = min(mins) if len(mins) == len(parts) else None
    out["max"] = max(maxs) if len(maxs) == len(parts) else None
    return out


def format_stats(stats: dict[str, Any]) -> str:
    if not stats.get("images"):
        return "no images"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} visual tokens per image ({stats['images']} images)"


# ---------------------------------------------------------------------------------------------- answer matching
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed ("The Cat." -> "cat")."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction (surrounding whitespace stripped) equals one of the answers exactly."""
    return prediction.strip() in [str(a).strip() for a in answers]


def normalized_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction equals one of the answers after :func:`normalize_answer`."""
    return normalize_answer(prediction) in [normalize_answer(a) for a in answers]


# ---------------------------------------------------------------------------------------------- quick evaluation
@dataclass
class Question:
    index: int
    image: str  # path relative to the image folder (or absolute)
    question: str
    answers: list[str]


def read_questions(json_path: str | Path, image_dir: str | Path | None = None) -> tuple[list[Question], Path]:
    """Read a JSON list of ``{"image", "question", "answer"}`` records; ``image_dir`` defaults to the file's folder.

    ``answer`` is a string or a list of accepted strings. Raises FileNotFoundError / ValueError naming the problem.
    """
    json_path = Path(json_path)
    records = read_json(json_path, "question list")
    if not isinstance(records, list) or not records:
        raise ValueError(f'{json_path} must hold a non-empty JSON list of {{"image", "question", "answer"}} records')
    questions = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {"image", "question", "answer"} <= set(r):
            missing = sorted({"image", "question", "answer"} - set(r)) if isinstance(r, dict) else "all keys"
            raise ValueError(f"{json_path}: record {i} lacks {missing}; expected image, question and answer")
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
            raise ValueError(f"{json_path}: record {i} has answer {r['answer']!r:.80}; expected a string or a list of strings")
        if not isinstance(r["image"], str) or not isinstance(r["question"], str):
            raise ValueError(f"{json_path}: record {i}: image and question must be strings")
        questions.append(Question(i, r["image"], r["question"], [str(a) for a in answers]))
    directory = Path(image_dir) if image_dir is not None else json_path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory not found: {directory}")
    return questions, directory


def questions_fingerprint(questions: Sequence[Question], image_dir: Path) -> str:
    h = hashlib.sha256(str(image_dir.resolve()).encode())
    for q in questions:
        h.update(json.dumps([q.image, q.question, q.answers]).encode())
    return h.hexdigest()[:16]


@dataclass
class EvalSummary:
    questions: int
    answered: int
    unreadable: list[str]  # images that could not be read (their questions are not scored)
    exact_match: float | None  # % of answered questions
    normalized_match: float | None
    tokens: dict[str, Any]
    output: str
    resumed_from: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.answered} of {self.questions} questions answered"]
        if self.resumed_from:
            out[0] += f" (resumed after {self.resumed_from})"
        if self.unreadable:
            out.append(f"{len(self.unreadable)} unreadable image(s), questions not scored: " + ", ".join(self.unreadable[:10]))
        if self.answered:
            out.append(f"exact match: {self.exact_match:.2f}%   normalised match: {self.normalized_match:.2f}%")
        out.append(f"visual tokens: {format_stats(self.tokens)}")
        out.append(f"per-question results: {self.output}")
        return out


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def _read_finished(output: Path, questions: Sequence[Question]) -> list[dict]:
    """Records already written (a torn last line from an interrupted write is cut off)."""
    records, good_bytes = [], 0
    with output.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not raw.endswith(b"\n"):
                break
            i = len(records)
            if i >= len(questions) or record.get("index") != i or record.get("image") != questions[i].image:
                raise ValueError(
                    f"{output} line {i + 1} does not match question {i} of the question list; "
                    "it was written for another list: choose another --output"
                )
            records.append(record)
            good_bytes += len(raw)
    if good_bytes != output.stat().st_size:
        with output.open("r+b") as f:
            f.truncate(good_bytes)
    return records


def summarize(records: Sequence[dict], questions: int, output: Path, resumed_from: int = 0) -> EvalSummary:
    answered = [r for r in records if r.get("error") is None]
    n = len(answered)
    exact = 100.0 * sum(r["exact_match"] for r in answered) / n if n else None
    norm = 100.0 * sum(r["normalized_match"] for r in answered) / n if n else None
    counts = [c for r in answered for c in r["visual_tokens"]]
    unreadable = [r["image"] for r in records if r.get("error") is not None]
    return EvalSummary(questions, n, unreadable, exact, norm, token_stats(counts), str(output), resumed_from)


def evaluate_questions(
    model: nn.Module,
    processor: Any,
    questions: Sequence[Question],
    image_dir: str | Path,
    output: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_suffix: str | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalSummary:
    """Answer every question (greedy), write one JSON line per question to ``output``, return the scores.

    Each question gets ``prompt_suffix`` appended; None: the checkpoint's own (:func:`choose_prompt_suffix`),
    else LLaVA-1.5's short-answer instruction.

    Resumable: ``output`` keeps every finished question, so a rerun continues after the last one; the settings
    and the question list are recorded next to it (``<output>.meta.json``) and a rerun with others is refused.
    An image that cannot be read is recorded with its error, counted, and the run goes on.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    image_dir, output = Path(image_dir), Path(output)
    prompt_suffix = choose_prompt_suffix(model, prompt_suffix, SHORT_ANSWER)
    meta = {
        "questions": len(questions),
        "fingerprint": questions_fingerprint(questions, image_dir),
        "max_new_tokens": max_new_tokens,
        "prompt_suffix": prompt_suffix,
        "settings": settings or {},
    }
    records: list[dict] = []
    if output.exists():
        if not meta_path(output).is_file():
            raise ValueError(f"{output} exists but has no {meta_path(output).name}: not a dymu eval output; choose another --output")
        previous = json.loads(meta_path(output).read_text())
        if previous != json.loads(json.dumps(meta)) and output.stat().st_size == 0:
            meta_path(output).write_text(json.dumps(meta, indent=1))  # nothing was answered: nothing to protect
        elif previous != json.loads(json.dumps(meta)):
            changed = sorted(k for k in set(previous) | set(meta) if previous.get(k) != json.loads(json.dumps(meta)).get(k))
            raise ValueError(
                f"{output} was written by a run with other questions or settings ({', '.join(changed)} differ); "
                "delete it or choose another --output"
            )
        records = _read_finished(output, questions)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        meta_path(output).write_text(json.dumps(meta, indent=1))
        output.touch()
    resumed = len(records)
    todo = list(questions[resumed:])
    bar = tqdm(total=len(questions), initial=resumed, desc="questions", unit="q", disable=not progress)
    with output.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            loaded, errors = [], {}
            for q in batch:
                path = Path(q.image) if Path(q.image).is_absolute() else image_dir / q.image
                try:
                    loaded.append((q, load_image(path)))
                except (FileNotFoundError, ValueError) as err:
                    errors[q.index] = str(err)
            gens = generate(
                model,
                processor,
                [Prompt(q.question + prompt_suffix, [img]) for q, img in loaded],
                max_new_tokens=max_new_tokens,
            )
            by_index = {q.index: g for (q, _), g in zip(loaded, gens)}
            lines = []
            for q in batch:
                record: dict[str, Any] = {"index": q.index, "image": q.image, "question": q.question, "answers": q.answers}
                if q.index in errors:
                    record.update(prediction=None, exact_match=False, normalized_match=False, visual_tokens=[], error=errors[q.index])
                    bar.write(f"unreadable image, question {q.index} not scored: {errors[q.index]}")
                else:
                    g = by_index[q.index]
                    pred = g.text.strip()
                    record.update(
                        prediction=pred,
                        exact_match=exact_match(pred, q.answers),
                        normalized_match=normalized_match(pred, q.answers),
                        visual_tokens=g.visual_tokens,
                        error=None,
                    )
                records.append(record)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    summary = summarize(records, len(questions), output, resumed)
    summary_path(output).write_text(json.dumps({k: v for k, v in asdict(summary).items() if k != "resumed_from"}, indent=1))
    return summary
