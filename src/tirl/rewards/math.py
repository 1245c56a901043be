"""Math answers: pull the last `\\boxed{}` out of a response and compare it with the gold.

Numbers are compared by relative precision, exact forms exactly (`_numbers_equal`): plain numbers, fractions
and `\\frac{a}{b}` in-process without sympy (the common case, microseconds); anything else goes to math-verify
(sympy) in a separate grader process with a wall-clock bound. A process boundary is the only bound that holds
everywhere: math-verify's own timeout is `signal.alarm`, which works only in the main thread and cannot interrupt
long C-level arithmetic (`10^{10^{10}}`), and a thread cannot be killed — a runaway parse in a worker thread would
hold the GIL and freeze the whole process. A grader past its bound is killed and the call answers False.
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


REL_TOL = Fraction(1, 10**5)  # decimals within 1e-5 relative (and consistent with their written digits) are equal


def _as_fraction(answer: str) -> tuple[Fraction, Fraction | None] | None:
    """(exact value, half a unit in the last written place) of a plain number, `a/b` or `\\frac{a}{b}`; the
    half-unit is None for exact forms (integers, fractions). None for anything else."""
    answer = answer.strip().strip("$").strip()
    try:
        if _PLAIN_NUMBER.match(answer):
            if "." not in answer:
                return Fraction(answer), None
            decimals = len(answer.split(".", 1)[1])
            return Fraction(answer), Fraction(1, 2 * 10**decimals)
        if match := _PLAIN_FRACTION.match(answer):
            return Fraction(int(match.group(1)), int(match.group(2))), None
        if match := _LATEX_FRACTION.match(answer):
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return (-value if match.group(1) == "-" else value), None
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _numbers_equal(a: Fraction, b: Fraction, half_units: list[Fraction]) -> bool:
    """Two exact values, each perhaps written as a rounded decimal (``half_units``: half a unit in the last place
    of each decimal written). Equal when identical; when a decimal is involved, also when the difference is within
    the coarser decimal's rounding AND within ``REL_TOL`` relative — so 0.333333 == 1/3 and 0.166667 == 1/6, but
    0.33 != 1/3, 1e-7 != 2e-7, 1234567.8 != 1234567 and -1e-9 != 1e-9. Two exact forms (integers, fractions)
    are equal only when identical."""
    if a == b:
        return True
    if not half_units:
        return False
    diff = abs(a - b)
    return diff <= max(half_units) and diff <= REL_TOL * max(abs(a), abs(b))


def _as_latex(answer: str) -> str:
    """Wrap a bare answer so math-verify's LaTeX extractor sees it."""
    if _MATH_DELIMITER.search(answer) or "\\boxed" in answer:
        return answer
    return f"${answer}$"


def math_equal(pred: str, gold: str, timeout_s: float = 5) -> bool:
    """Is the predicted answer mathematically equal to the gold answer (1/2 == 0.5 == \\frac{1}{2})?

    Both are answer strings (e.g. `last_boxed` output), not whole responses. Plain numbers and fractions are
    compared in-process (`_numbers_equal`: exact forms exactly, decimals by relative precision); anything else
    is graded by math-verify in a grader process and waits at most ``timeout_s`` seconds of wall clock for it (plus
    ~1 s to start a grader, once per concurrent caller or after a kill), in any thread or process. Never raises: anything math-verify cannot handle,
    or that runs past the bound, is False.
    """
    pred_value, gold_value = _as_fraction(pred), _as_fraction(gold)
    if pred_value is not None and gold_value is not None:
        halves = [h for h in (pred_value[1], gold_value[1]) if h is not None]
        return _numbers_equal(pred_value[0], gold_value[0], halves)
    return _GRADERS.grade(pred, gold, timeout_s)


def _sympy_equal(pred: str, gold: str, timeout_s: int | None) -> bool:
    """math-verify's verdict, with numbers (no free symbols) compared by relative precision instead of its fixed
    6-decimal rounding; runs in the grader process (its main thread, so math-verify's alarms work there too)."""
    from math_verify import parse, verify

    try:
        gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout_s)
        pred_parsed = parse(_as_latex(pred), parsing_timeout=timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        numbers = _numeric_pair(gold_parsed[0], pred_parsed[0])
        if numbers is not None:
            return numbers
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except Exception:  # math-verify raises assorted sympy errors and TimeoutException on odd input
        return False


def _numeric_pair(gold: Any, pred: Any) -> bool | None:
    """Verdict for two sympy numbers: within ``REL_TOL`` relative at 30 digits, and, when neither holds a decimal
    (Float), exactly equal (10^{20}+1 != 10^{20}); None when either is not a plain number (symbols, relations,
    sets, matrices: math-verify's job)."""
    import sympy

    if not all(isinstance(x, sympy.Expr) and x.is_number and not x.free_symbols for x in (gold, pred)):
        return None
    g, p = sympy.N(gold, 30), sympy.N(pred, 30)
    if not all(x.is_finite for x in (g, p)):
        return None
    scale = max(abs(g), abs(p))
    if abs(g - p) > sympy.Rational(REL_TOL.numerator, REL_TOL.denominator) * scale:
        return False
    if gold.has(sympy.Float) or pred.has(sympy.Float):
        return True
    diff = sympy.simplify(gold - pred)       # exact forms: exactly (sqrt(8) - 2 sqrt(2) simplifies to 0)
    if diff.is_zero is not None:
        return bool(diff.is_zero)
    return bool(abs(sympy.N(diff, 60)) <= sympy.Rational(1, 10**50) * scale)


class _GraderPool:
    """Grader processes (``python -m tirl.rewards.math``), one per concurrent caller, reused between calls.

    A call takes an idle grader (or starts one), sends one JSON line and waits for the verdict at most its bound;
    a grader that misses it is killed (never reused). Up to ``keep_idle`` graders stay alive between calls."""

    def __init__(self, keep_idle: int = 4) -> None:
        self.keep_idle = keep_idle
        self._idle: list = []
        self._lock = threading.Lock()

    def _start(self):
        """A new grader, once it has loaded math-verify (None if it cannot start within a minute)."""
        import os
        import select
        import subprocess
        import sys
        from pathlib import Path

        src = str(Path(__file__).resolve().parents[2])   # the directory holding the tirl package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "tirl.rewards.math"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        except OSError:
            return None
        ready, _, _ = select.select([proc.stdout], [], [], 60.0)
        if ready and proc.stdout.readline() == "ready\n":
            return proc
        proc.kill()
        proc.wait()
        return None

    def grade(self, pred: str, gold: str, timeout_s: float) -> bool:
        import json
        import select

        with self._lock:
            proc = self._idle.pop() if self._idle else None
        if proc is None or proc.poll() is not None:
            proc = self._start()
            if proc is None:
                return False
        try:
            proc.stdin.write(json.dumps([pred, gold, max(1, int(timeout_s))]) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            line = proc.stdout.readline() if ready else ""
            verdict = json.loads(line) if line else None
        except (OSError, ValueError):
            verdict = None
        if verdict is None:     # past its bound (or dead): never reuse it
            proc.kill()
            proc.wait()
            return False
        with self._lock:
            if len(self._idle) < self.keep_idle:
                self._idle.append(proc)
                proc = None
        if proc is not None:
            proc.stdin.close()
            proc.wait()
        return bool(verdict)


_GRADERS = _GraderPool()


def _serve() -> None:
    """The grader process: one JSON line ``[pred, gold, timeout_s]`` in, one ``true``/``false`` line out."""
    import json
    import sys

    import math_verify  # noqa: F401  (loaded before the first request, so it is not part of a call's time)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        pred, gold, timeout_s = json.loads(line)
        sys.stdout.write(json.dumps(_sympy_equal(pred, gold, timeout_s)) + "\n")
        sys.stdout.flush()


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


if __name__ == "__main__":
    _serve()
