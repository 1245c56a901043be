"""The text formats tool-integrated reasoning is written in (Qwen3 conventions; the tiny model uses the same).

- Reasoning: ``<think>\\n…\\n</think>\\n\\n`` before the answer.
- A code call: a ```` ```python\\n…\\n``` ```` block; generation pauses when it closes and the environment runs it.
- The environment's reply: ```` ```output\\n…\\n``` ```` right after the block.

Every reader and writer of these formats (rollout, rewards, data, pipelines, evaluation) takes them from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CODE_OPEN = "```python"                 # what opens a block the environment runs
FENCE_CLOSE = "\n```"                   # what closes any block
OUTPUT_OPEN = "```output\n"
CODE_BLOCK = re.compile(r"```python\n(.*?)\n```", re.S)     # group 1: the code
OUTPUT_BLOCK = re.compile(r"```output\n.*?\n```", re.S)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a response, the rule of Qwen3's chat template and bfcl-eval's Qwen handler: the
    reasoning is what precedes the first ``</think>`` (a leading ``<think>`` dropped, whitespace stripped), the
    answer what follows the last one (leading newlines dropped).

    No ``</think>``: (None, text) — unless the text opens with ``<think>`` (generation was cut inside the
    reasoning), then (the reasoning so far, ""). A leading ``<think>`` may be absent because some chat templates
    put it in the prompt.
    """
    if THINK_CLOSE not in text:
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN):
            return stripped[len(THINK_OPEN):].strip(), ""
        return None, text
    head = text.partition(THINK_CLOSE)[0].lstrip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN):]
    return head.strip(), text.rpartition(THINK_CLOSE)[2].lstrip("\n")


def with_reasoning(reasoning: str, answer: str) -> str:
    """``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` — the layout D-CORE's format reward checks."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"


def code_block(code: str) -> str:
    return f"{CODE_OPEN}\n{code}{FENCE_CLOSE}"


def output_block(output: str) -> str:
    return f"{OUTPUT_OPEN}{output}{FENCE_CLOSE}"


def code_block_end(text: str) -> int | None:
    """End (exclusive character index) of the closing fence of the first ```python block in ``text``; None
    while no block has closed. Generation pauses there for the environment."""
    start = text.find(CODE_OPEN)
    close = text.find(FENCE_CLOSE, start + len(CODE_OPEN)) if start >= 0 else -1
    return close + len(FENCE_CLOSE) if close >= 0 else None


def last_code_block(text: str) -> str | None:
    """The code of the last complete ```python block, or None."""
    blocks = CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def fence_token_index(ids: list[int], decode: Callable[[list[int]], str]) -> int:
    """Index of the token in which the last ```python fence of ``decode(ids)`` starts (exact, by bisecting over
    decoded prefixes: the smallest k whose ``decode(ids[:k+1])`` reaches past the fence's first character)."""
    start = decode(ids).rfind(CODE_OPEN)
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid + 1])) > start:
            hi = mid
        else:
            lo = mid + 1
    return lo
