"""D-CORE's lazy-reasoning diagnostic: wrong answers behind long reasoning full of second-guessing.

A trace is lazy if it is wrong, its reasoning exceeds `min_reasoning_tokens` tokens, and it contains at
least `min_reflective` reflective words (wait, but, however, alternatively) counted as whole words,
case-insensitively ("butter" and "awaits" do not count).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from tirl.tools.text_format import split_reasoning

REFLECTIVE_WORDS = ("wait", "but", "however", "alternatively")
_REFLECTIVE = re.compile(r"\b(?:" + "|".join(REFLECTIVE_WORDS) + r")\b", re.IGNORECASE)


def count_reflective(text: str) -> int:
    """Whole-word, case-insensitive count of reflective words in `text`."""
    return len(_REFLECTIVE.findall(text))


def _length_fn(tokenizer_or_len_fn: Any) -> Callable[[str], int]:
    # Check `encode` first: HF tokenizers are callable too, but calling one returns a BatchEncoding.
    if hasattr(tokenizer_or_len_fn, "encode"):
        return lambda text: len(tokenizer_or_len_fn.encode(text, add_special_tokens=False))
    if callable(tokenizer_or_len_fn):
        return lambda text: int(tokenizer_or_len_fn(text))
    raise TypeError("Pass a tokenizer (with .encode) or a function text -> token count to measure reasoning length.")


def _reasoning_of(response: str) -> str:
    """The `<think>` block; a response without one is all reasoning (models that do not use the tags)."""
    reasoning, _ = split_reasoning(response)
    return response if reasoning is None else reasoning


def is_lazy(
    response: str,
    correct: bool,
    tokenizer_or_len_fn: Any,
    min_reasoning_tokens: int = 200,
    min_reflective: int = 3,
) -> bool:
    """Wrong AND reasoning longer than `min_reasoning_tokens` AND >= `min_reflective` reflective words."""
    if correct:
        return False
    reasoning = _reasoning_of(response)
    if count_reflective(reasoning) < min_reflective:
        return False
    return _length_fn(tokenizer_or_len_fn)(reasoning) > min_reasoning_tokens


def lazy_ratio(
    responses: Sequence[str],
    corrects: Sequence[bool],
    tokenizer_or_len_fn: Any,
    min_reasoning_tokens: int = 200,
    min_reflective: int = 3,
) -> float:
    """Fraction of all responses that are lazy (the denominator counts correct ones too)."""
    if len(responses) != len(corrects):
        raise ValueError(f"Got {len(responses)} responses but {len(corrects)} correctness flags; pass one flag per response.")
    if not responses:
        raise ValueError("lazy_ratio needs at least one response.")
    length = _length_fn(tokenizer_or_len_fn)
    lazy = sum(
        is_lazy(r, c, length, min_reasoning_tokens, min_reflective) for r, c in zip(responses, corrects, strict=True)
    )
    return lazy / len(responses)
