"""Math answers: pull the last `\\boxed{}` out of a response and compare it with the gold via math-verify.

math-verify bounds its parse/verify time with `signal.alarm`, which only works in the main thread of the
main interpreter (elsewhere it raises). We keep the alarm where it works and switch it off in other
threads (reward worker threads), trading the time bound for not crashing; dataloader worker processes
run in their own main thread and keep it.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

_BOXED_COMMANDS = ("\\boxed", "\\fbox")
_PLAIN_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_PLAIN_FRACTION = re.compile(r"^([+-]?\d+)\s*/\s*([+-]?\d+)$")
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[")  # an unescaped $, \( or \[ ; "\$5" is a dollar amount
_LATEX_FRACTION = re.compile(r"^([+-]?)\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces, nesting allowed) or `\\boxed 5`; None if absent."""
    start = max(text.rfind(cmd) for cmd in _BOXED_COMMANDS)
    while start != -1:
        content = _boxed_content_at(text, start)
        if content is not None:
            return content
        # An unclosed or empty \boxed: fall back to an earlier one.
        start = max(text.rfind(cmd, 0, start) for cmd in _BOXED_COMMANDS)
    return None


def _boxed_content_at(text: str, start: int) -> str | None:
    cmd = next(c for c in _BOXED_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    content = text[i + 1 : j].strip()
                    return content or None
        return None
    if i < len(text) and text[i] == " ":  # `\boxed 5`: the answer runs to whitespace or `$`
        match = re.match(r" +([^\s$]+)", text[i:])
        return match.group(1) if match else None
    return None


def _as_fraction(answer: str) -> Fraction | None:
    """Exact value of a plain number, `a/b` or `\\frac{a}{b}`; None for anything else."""
    answer = answer.strip().strip("$").strip()
    try:
        if _PLAIN_NUMBER.match(answer):
            return Fraction(answer)
        if match := _PLAIN_FRACTION.match(answer):
            return Fraction(int(match.group(1)), int(match.group(2)))
        if match := _LATEX_FRACTION.match(answer):
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return -value if match.group(1) == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _as_latex(answer: str) -> str:
    """Wrap a bare answer so math-verify's LaTeX extractor sees it."""
    if _MATH_DELIMITER.search(answer) or "\\boxed" in answer:
        return answer
    return f"${answer}$"


def math_equal(pred: str, gold: str, timeout_s: int = 5) -> bool:
    """Is the predicted answer mathematically equal to the gold answer (1/2 == 0.5 == \\frac{1}{2})?

    Both are answer strings (e.g. `last_boxed` output), not whole responses. Plain numbers and fractions
    are compared exactly without sympy; a decimal that differs falls through to math-verify, whose
    rounding accepts 0.333333 for 1/3. Never raises: anything math-verify cannot handle is False.
    """
    pred_value, gold_value = _as_fraction(pred), _as_fraction(gold)
    if pred_value is not None and gold_value is not None:
        if pred_value == gold_value:
            return True
        if "." not in pred and "." not in gold:
            return False
    from math_verify import parse, verify  # imported late: ~0.4 s, and only reward workers need it

    # The alarm-based time bound only works in the main thread (see module docstring).
    bound = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(_as_latex(gold), parsing_timeout=bound)
        pred_parsed = parse(_as_latex(pred), parsing_timeout=bound)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=bound))
    except Exception:  # math-verify raises assorted sympy errors and TimeoutException on odd input
        return False


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"A completion must be a string or a list of chat messages, got {type(completion).__name__}.")


class MathAnswerReward:
    """Reward callable: 1.0 if the last `\\boxed{}` in a completion equals the gold answer, else 0.0."""

    def __init__(self, timeout_s: int = 5) -> None:
        self.timeout_s = timeout_s

    def __call__(self, completions: list[Any], answer: list[str], **columns: Any) -> list[float]:
        if len(completions) != len(answer):
            raise ValueError(f"Got {len(completions)} completions but {len(answer)} answers; pass one answer per completion.")
        rewards = []
        for completion, gold in zip(completions, answer, strict=True):
            pred = last_boxed(completion_text(completion))
            rewards.append(1.0 if pred is not None and math_equal(pred, str(gold), self.timeout_s) else 0.0)
        return rewards
