"""Degenerate-loop detector: THOR's episode reward is 0 on heavy repetition and TIRGen drops such samples."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks; no tokenizer needed

# Defaults. n = 20 tokens: long enough that formulaic math prose ("Let me check the value of x .")
# rarely repeats by chance, while a loop of any period still repeats its 20-grams. max_ratio = 0.2: a
# trace whose n-grams are more than 20 % copies of earlier ones is looping (a loop that fills the rest
# of a length-capped generation easily exceeds it; re-running one edited code block does not).
DEFAULT_N = 20
DEFAULT_MAX_RATIO = 0.2


def repeated_ngram_ratio(text: str, n: int = DEFAULT_N) -> float:
    """Fraction of the text's token n-grams that already occurred earlier in it (0.0 when it has none)."""
    if n < 1:
        raise ValueError(f"n-gram size must be at least 1, got n={n}.")
    tokens = _TOKEN.findall(text.lower())
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(tokens[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


def has_heavy_repetition(text: str, n: int = DEFAULT_N, max_ratio: float = DEFAULT_MAX_RATIO) -> bool:
    """True if more than `max_ratio` of the text's `n`-token n-grams repeat earlier ones (see defaults above)."""
    return repeated_ngram_ratio(text, n) > max_ratio
