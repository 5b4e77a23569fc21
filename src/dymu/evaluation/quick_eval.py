"""The quick local evaluation behind ``dymu eval``: a JSON list of ``{"image", "question", "answer"}`` records
(``answer`` a string or a list of accepted strings), answered greedily in batches, one JSON line per question.

Resumable: a rerun with the same output continues after the last finished question, and the file then equals an
uninterrupted run's; the questions' fingerprint and the settings are kept next to it, and a rerun with others is
refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from tqdm import tqdm

from dymu.data import load_image, read_json
from dymu.evaluation.answers import exact_match, normalized_match
from dymu.evaluation.inference import generate
from dymu.evaluation.prompts import SHORT_ANSWER, Prompt, choose_prompt_suffix
from dymu.evaluation.stats import format_stats, token_stats


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
