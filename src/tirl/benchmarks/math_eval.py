"""Math metrics over n samples per problem: Avg@n, unbiased pass@k, self-rewarded best-of-n, tokens used.

pass@k is the unbiased estimator of Chen et al. (2021): with c correct among n samples,
pass@k = 1 - C(n-c, k) / C(n, k), computed as a product to stay exact for large n.
Best-of-n is THOR's self-reward: the sample whose code blocks ran best (highest pass rate of its tool calls)
is the answer, with no access to the gold. A sample without code has pass rate 0; ties go to the sample with a
\\boxed{} answer, then to the earliest sample, so the choice is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tirl.rewards.math import last_boxed, math_equal


@dataclass
class MathSample:
    """One generated solution, as cached (the answer and its correctness are derived, never stored)."""

    text: str                           # the whole response, tool output included
    response_tokens: int                # everything after the prompt, tool output included
    model_tokens: int                   # tokens the model wrote
    calls: int
    passed_calls: int
    corrections: int = 0
    stop_reason: str = ""
    model_text: str | None = None       # what the model wrote (tool output left out); None in caches made before it

    @property
    def code_pass_rate(self) -> float:
        return self.passed_calls / self.calls if self.calls else 0.0

    @property
    def answer(self) -> str | None:
        """The last \\boxed{} the model wrote (a tool output that prints one is not the model's answer)."""
        return last_boxed(self.text if self.model_text is None else self.model_text)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):   # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def best_of_n_index(samples: list[MathSample]) -> int:
    """Index of the self-rewarded pick: highest code pass rate, then has a boxed answer, then earliest."""
    if not samples:
        raise ValueError("best_of_n_index needs at least one sample.")
    return max(range(len(samples)),
               key=lambda i: (samples[i].code_pass_rate, samples[i].answer is not None, -i))


def judge(samples: list[MathSample], gold: str) -> list[bool]:
    """Correctness of each sample's last \\boxed{} answer against the gold (math-verify)."""
    return [s.answer is not None and math_equal(s.answer, gold) for s in samples]


def bench_metrics(samples_per_problem: list[list[MathSample]], corrects: list[list[bool]],
                  pass_k: list[int]) -> dict[str, float]:
    """Benchmark numbers (accuracies in %, like the papers' tables) from per-problem samples and verdicts."""
    if not samples_per_problem:
        raise ValueError("bench_metrics needs at least one problem.")
    n = len(samples_per_problem[0])
    if any(len(s) != n for s in samples_per_problem):
        raise ValueError("Every problem needs the same number of samples for Avg@n and pass@k.")
    problems = len(samples_per_problem)
    flat = [s for samples in samples_per_problem for s in samples]
    metrics: dict[str, float] = {
        f"avg@{n}": 100.0 * sum(sum(c) / n for c in corrects) / problems,
        "best_of_n": 100.0 * sum(c[best_of_n_index(s)] for s, c in zip(samples_per_problem, corrects)) / problems,
        "problems": float(problems),
        "samples": float(len(flat)),
        "mean_response_tokens": sum(s.response_tokens for s in flat) / len(flat),
        "mean_model_tokens": sum(s.model_tokens for s in flat) / len(flat),
        "total_tokens": float(sum(s.response_tokens for s in flat)),
        "calls_per_sample": sum(s.calls for s in flat) / len(flat),
        "code_pass_rate": (sum(s.passed_calls for s in flat) / max(1, sum(s.calls for s in flat))) * 100.0,
        "corrections_per_sample": sum(s.corrections for s in flat) / len(flat),
        "boxed_rate": 100.0 * sum(s.answer is not None for s in flat) / len(flat),
    }
    for k in pass_k:
        metrics[f"pass@{k}"] = 100.0 * sum(pass_at_k(n, sum(c), k) for c in corrects) / problems
    return metrics


def sample_record(sample: MathSample) -> dict[str, Any]:
    return {k: getattr(sample, k) for k in ("text", "model_text", "response_tokens", "model_tokens", "calls",
                                            "passed_calls", "corrections", "stop_reason")}
