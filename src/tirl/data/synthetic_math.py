"""Seeded, unlimited math word problems that need computation, with THOR-style tool-integrated solutions.

Problem ``index`` of a stream is a pure function of (seed, index, levels, split), so a stream can be resumed
at any position and two runs with one seed see the same problems. Levels:

1. one operation on 2-3 digit numbers (``a + b``, ``a * b``);
2. two steps (``a * b + c``, ``a * b - c``);
3. three-step word problems (boxes of apples, classes of students, buying books or cards);
4. a loop or a library call (range sums, gcd, modular powers, digit sums, counting multiples).

Train and held-out problems are told apart by a hash of the question text (about 1 in 10 questions is
held-out), so no held-out problem ever equals a train problem, whatever the seeds.

A solution is short and regular so the tiny model learns it in minutes::

    <think>\\nMultiply, then add.\\n</think>\\n\\n```python\\nprint(37 * 48 + 5)\\n```\\n```output\\n1781\\n```\\n\\boxed{1781}

The output block is what the sandbox printed when it really ran the code, never the generator's own value;
the two must agree or the sample is refused.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from math import gcd
from typing import Any

from tirl.tools.text_format import CODE_OPEN, code_block, output_block, with_reasoning

LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "heldout", "sft", "rl")
HELDOUT_BUCKETS = 26  # of 256: questions whose hash starts with a byte below this are held-out (~10%)
SFT_BUCKETS_END = 141  # the train buckets 26..140 are its "sft" half, 141..255 its "rl" half


@dataclass(frozen=True)
class MathProblem:
    level: int
    question: str
    think: str  # one templated sentence of reasoning
    code: str  # the Python that computes the answer and prints it
    answer: str  # gold answer, computed here independently of the sandbox

    @property
    def key(self) -> str:
        return question_hash(self.question)


def question_hash(question: str) -> str:
    return hashlib.sha256(question.encode()).hexdigest()


def in_split(text: str, split: str) -> bool:
    """Whether ``text`` (a question, or a tool-call task's key) falls in ``split``, by a hash of it.

    ``heldout`` (~10%) never meets ``train``; ``train`` is the union of two disjoint halves, ``sft`` and ``rl``
    (~45% each), so a warm start can be SFT'd on one and RL'd on prompts it has never seen.
    """
    bucket = int(question_hash(text)[:2], 16)
    if split == "heldout":
        return bucket < HELDOUT_BUCKETS
    if split == "train":
        return bucket >= HELDOUT_BUCKETS
    if split == "sft":
        return HELDOUT_BUCKETS <= bucket < SFT_BUCKETS_END
    return bucket >= SFT_BUCKETS_END


def first_distinct(n: int, item_at: Callable[[int], Any], what: str) -> list:
    """The first ``n`` items of the stream ``item_at(0), item_at(1), …`` with distinct ``.key`` (a fixed set, e.g.
    held-out val/test). Raises RuntimeError, saying to ask for fewer ``what``, when the stream runs dry."""
    seen: set[str] = set()
    out: list = []
    index = 0
    while len(out) < n:
        item = item_at(index)
        index += 1
        if item.key not in seen:
            seen.add(item.key)
            out.append(item)
        if index > 100 * n + 1000:
            raise RuntimeError(f"Could not find {n} distinct {what}; ask for fewer.")
    return out


# ---------------------------------------------------------------- problem makers, one per kind


def _add(r: random.Random) -> MathProblem:
    a, b = r.randint(10, 999), r.randint(10, 999)
    return MathProblem(1, f"What is {a} + {b}?", "Add the numbers.", f"print({a} + {b})", str(a + b))


def _mul(r: random.Random) -> MathProblem:
    a, b = r.randint(10, 999), r.randint(10, 99)
    return MathProblem(1, f"What is {a} * {b}?", "Multiply the numbers.", f"print({a} * {b})", str(a * b))


def _mul_add(r: random.Random) -> MathProblem:
    a, b, c = r.randint(10, 99), r.randint(10, 99), r.randint(10, 999)
    return MathProblem(2, f"What is {a} * {b} + {c}?", "Multiply, then add.", f"print({a} * {b} + {c})",
                       str(a * b + c))


def _mul_sub(r: random.Random) -> MathProblem:
    a, b, c = r.randint(10, 99), r.randint(10, 99), r.randint(10, 99)
    return MathProblem(2, f"What is {a} * {b} - {c}?", "Multiply, then subtract.", f"print({a} * {b} - {c})",
                       str(a * b - c))


def _apples(r: random.Random) -> MathProblem:
    a, b = r.randint(2, 30), r.randint(2, 30)
    c, d = r.randint(1, a * b), r.randint(1, 99)
    q = f"Tom has {a} boxes of {b} apples, sells {c}, buys {d}. How many apples now?"
    return MathProblem(3, q, "Multiply, subtract, then add.", f"print({a} * {b} - {c} + {d})", str(a * b - c + d))


def _students(r: random.Random) -> MathProblem:
    a, b = r.randint(10, 40), r.randint(2, 20)
    c, d = r.randint(1, a * b), r.randint(1, 99)
    q = f"{b} classes of {a} students; {c} leave, {d} join. How many now?"
    return MathProblem(3, q, "Multiply, subtract, then add.", f"print({b} * {a} - {c} + {d})", str(b * a - c + d))


def _books(r: random.Random) -> MathProblem:
    a, b, d = r.randint(2, 9), r.randint(2, 30), r.randint(1, 99)
    c = r.randint(a * b, a * b + 300)
    q = f"Ann has ${c}, buys {a} books at ${b}, gets ${d}. How much now?"
    return MathProblem(3, q, "Subtract the cost, then add.", f"print({c} - {a} * {b} + {d})", str(c - a * b + d))


def _cards(r: random.Random) -> MathProblem:
    a, b, c, d = r.randint(2, 30), r.randint(2, 20), r.randint(2, 30), r.randint(2, 20)
    q = f"Tom buys {a} cards at ${b} and {c} tickets at ${d}. What is the total cost?"
    return MathProblem(3, q, "Add the two costs.", f"print({a} * {b} + {c} * {d})", str(a * b + c * d))


def _range_sum(r: random.Random) -> MathProblem:
    a = r.randint(1, 99)
    b = a + r.randint(10, 400)
    return MathProblem(4, f"What is the sum of the integers from {a} to {b}?", "Sum the range.",
                       f"print(sum(range({a}, {b} + 1)))", str(sum(range(a, b + 1))))


def _gcd(r: random.Random) -> MathProblem:
    g = r.randint(2, 60)
    a, b = g * r.randint(2, 90), g * r.randint(2, 90)
    return MathProblem(4, f"What is the gcd of {a} and {b}?", "Use math.gcd.",
                       f"import math\nprint(math.gcd({a}, {b}))", str(gcd(a, b)))


def _pow_mod(r: random.Random) -> MathProblem:
    a, b, m = r.randint(2, 99), r.randint(10, 999), r.randint(7, 997)
    return MathProblem(4, f"What is {a}^{b} mod {m}?", "Use pow with a modulus.", f"print(pow({a}, {b}, {m}))",
                       str(pow(a, b, m)))


def _digit_sum(r: random.Random) -> MathProblem:
    a, b = r.randint(2, 99), r.randint(5, 60)
    return MathProblem(4, f"What is the sum of the digits of {a}^{b}?", "Sum the digits.",
                       f"print(sum(int(d) for d in str({a} ** {b})))", str(sum(int(d) for d in str(a**b))))


def _multiples(r: random.Random) -> MathProblem:
    n, k = r.randint(100, 999), r.randint(3, 97)
    return MathProblem(4, f"How many integers from 1 to {n} are multiples of {k}?", "Use a range.",
                       f"print(len(range({k}, {n} + 1, {k})))", str(n // k))


MAKERS: dict[int, tuple[Callable[[random.Random], MathProblem], ...]] = {
    1: (_add, _mul),
    2: (_mul_add, _mul_sub),
    3: (_apples, _students, _books, _cards),
    4: (_range_sum, _gcd, _pow_mod, _digit_sum, _multiples),
}


def check_levels(levels: Iterable[int]) -> tuple[int, ...]:
    levels = tuple(sorted(set(int(x) for x in levels)))
    if not levels or any(x not in MAKERS for x in levels):
        raise ValueError(f"Math levels must be a non-empty subset of {list(LEVELS)}, got {list(levels)}.")
    return levels


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    return split


def problem_at(seed: int, index: int, levels: Sequence[int] = LEVELS, split: str = "train") -> MathProblem:
    """Problem number ``index`` of the stream (seed, levels, split): pure, so streams resume anywhere."""
    levels = check_levels(levels)
    check_split(split)
    for attempt in range(10_000):  # a split holds >= ~10% of draws, so a few attempts suffice
        rng = random.Random(f"tirl-math:{seed}:{index}:{attempt}")
        problem = rng.choice(MAKERS[rng.choice(levels)])(rng)
        if in_split(problem.question, split):
            return problem
    raise RuntimeError(f"No {split} problem found for seed {seed}, index {index}; this is a generator bug.")


def unique_problems(n: int, seed: int, levels: Sequence[int] = LEVELS, split: str = "train") -> list[MathProblem]:
    """The first ``n`` distinct problems of a stream (a fixed set, e.g. held-out val/test)."""
    return first_distinct(n, lambda index: problem_at(seed, index, levels, split),
                          f"problems at levels {list(levels)}")


# ---------------------------------------------------------------- records


def math_rl_prompt(problem: MathProblem, prompt_id: str) -> dict:
    """An RL prompt record (DESIGN.md data contract)."""
    return {"id": prompt_id, "task": "math", "messages": [{"role": "user", "content": problem.question}],
            "answer": problem.answer, "level": problem.level}


def solution_text(problem: MathProblem, output: str) -> str:
    """The assistant turn: think sentence, code, the environment's output block, boxed answer."""
    return with_reasoning(problem.think, f"{code_block(problem.code)}\n{output_block(output)}\n\\boxed{{{problem.answer}}}")


def math_sft_sample(problem: MathProblem, output: str) -> dict:
    """An SFT sample whose output block is recorded as the environment's (``env_spans``), not found by pattern."""
    text = solution_text(problem, output)
    block = output_block(output)
    start = text.index(block, text.index(CODE_OPEN) + len(problem.code))
    turn = {"role": "assistant", "content": text, "env_spans": [[start, start + len(block)]]}
    return {"task": "math", "messages": [{"role": "user", "content": problem.question}, turn], "loss_on": "assistant"}


def make_math_rl_prompts(n: int, seed: int, levels: Sequence[int] = LEVELS, split: str = "train",
                         start: int = 0) -> list[dict]:
    """Prompts ``start .. start+n-1`` of the stream; held-out sets are de-duplicated."""
    if split == "heldout":
        problems = unique_problems(start + n, seed, levels, split)[start:]
    else:
        problems = [problem_at(seed, i, levels, split) for i in range(start, start + n)]
    return [math_rl_prompt(p, f"math-{split}-{seed}-{start + i}") for i, p in enumerate(problems)]


def make_math_sft_samples(n: int, seed: int, levels: Sequence[int] = LEVELS, sandbox=None,
                          split: str = "train") -> list[dict]:
    """``n`` distinct SFT samples whose output blocks come from running their code in ``sandbox``.

    ``sandbox`` is anything with ``run_batch(codes) -> list[ExecResult]`` (tirl.tools.sandbox.LocalSandbox).
    """
    if sandbox is None:
        raise ValueError("make_math_sft_samples needs a sandbox to run the solutions' code, e.g. LocalSandbox().")
    problems = unique_problems(n, seed, levels, split)
    results = sandbox.run_batch([p.code for p in problems])
    samples = []
    for problem, result in zip(problems, results, strict=True):
        output = result.stdout.strip()
        if not result.passed or output != problem.answer:
            raise RuntimeError(
                f"The sandbox printed {output!r} (ok={result.ok}, error={result.error}) for {problem.code!r} "
                f"but the answer is {problem.answer!r}; check the sandbox's limits.")
        samples.append(math_sft_sample(problem, output))
    return samples
