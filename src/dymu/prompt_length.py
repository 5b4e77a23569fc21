"""Prompts that do not fit: the language model's context, checked before generating.

A prompt past ``max_position_embeddings`` runs for minutes at positions the model never saw and answers nothing
useful; :func:`check_context` refuses it with the numbers instead (``dymu generate``, ``dymu eval``, lmms-eval).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def context_length(model: nn.Module) -> int | None:
    """The language model's context (``max_position_embeddings`` of the text config), None where unknown."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def check_context(model: nn.Module, inputs: Any, new_tokens: int = 1) -> None:
    """Refuse, before generating, a prompt that leaves no room in the model's context for ``new_tokens``: it would
    run for minutes past the positions the model was trained on and answer nothing useful. The length is the
    processor's (placeholders expanded to the full image count): VTU gives the language model those positions,
    merged or not."""
    limit = context_length(model)
    if limit is None:
        return
    ids = inputs["input_ids"]
    lengths = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else [ids.shape[1]] * len(ids)
    for row, n in enumerate(lengths):
        if n + new_tokens > limit:
            image_id = getattr(model.config, "image_token_id", None)
            images = int((ids[row] == image_id).sum()) if image_id is not None else 0
            raise ValueError(
                f"prompt {row + 1} is {int(n)} tokens with its image placeholders expanded ({images} image tokens, "
                f"{int(n) - images} text tokens), but the language model's context is {limit} tokens "
                "(max_position_embeddings): shorten the prompt"
            )
