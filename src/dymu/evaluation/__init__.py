"""Evaluating VLMs + DyMU: batched generation and log-likelihoods that report each image's visual token count,
answer matching, statistics, and the quick local evaluation behind ``dymu eval``.

One job per module: :mod:`~dymu.evaluation.prompts` (checkpoint, request and chat prompt),
:mod:`~dymu.evaluation.inference` (batched generate / log-likelihood, visual token counts),
:mod:`~dymu.evaluation.answers` (answer matching), :mod:`~dymu.evaluation.stats` (token statistics, Wilson
interval), :mod:`~dymu.evaluation.quick_eval` (the resumable JSON evaluation); the small VLM's easy-VQA table:
:mod:`~dymu.evaluation.easy_vqa_rows` (its rows) and :mod:`~dymu.evaluation.easy_vqa_report` (its CSV, markdown
and plot). Every name below is importable from ``dymu.evaluation`` as before the split.
"""

from dymu.evaluation.answers import exact_match, normalize_answer, normalized_match
from dymu.evaluation.inference import (
    Generation,
    LogLikelihood,
    chat_inputs,
    cut_at,
    encode_texts,
    generate,
    loglikelihood,
    set_token_order,
)
from dymu.evaluation.prompts import (
    SHORT_ANSWER,
    Prompt,
    chat_text,
    choose_prompt_suffix,
    ensure_chat_template,
    image_token,
    resolve_pretrained,
)
from dymu.evaluation.quick_eval import (
    EvalSummary,
    Question,
    evaluate_questions,
    meta_path,
    questions_fingerprint,
    read_questions,
    summarize,
    summary_path,
)
from dymu.evaluation.stats import format_stats, pooled_stats, token_stats, wilson

__all__ = [
    "SHORT_ANSWER",
    "EvalSummary",
    "Generation",
    "LogLikelihood",
    "Prompt",
    "Question",
    "chat_inputs",
    "chat_text",
    "choose_prompt_suffix",
    "cut_at",
    "encode_texts",
    "ensure_chat_template",
    "evaluate_questions",
    "exact_match",
    "format_stats",
    "generate",
    "image_token",
    "loglikelihood",
    "meta_path",
    "normalize_answer",
    "normalized_match",
    "pooled_stats",
    "questions_fingerprint",
    "read_questions",
    "resolve_pretrained",
    "set_token_order",
    "summarize",
    "summary_path",
    "token_stats",
    "wilson",
]
