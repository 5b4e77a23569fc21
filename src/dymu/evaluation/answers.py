"""Scoring a predicted answer against the accepted ones: exact, and after normalisation."""

from __future__ import annotations

import re
import string
from typing import Sequence

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
