"""The math task: for each benchmark, generate (or reuse cached) tool-integrated solutions, judge, score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tirl.benchmarks.generate import EvalGenerator
from tirl.benchmarks.math_bench import load_benchmark
from tirl.benchmarks.math_eval import MathSample, bench_metrics, best_of_n_index, judge, sample_record
from tirl.benchmarks.results import GenerationCache, settings_hash
from tirl.benchmarks.task_config import MathTaskConfig
from tirl.data.prompts import math_record

TABLE_COLUMNS = ["id", "gold", "best_of_n_answer", "best_of_n_correct", "correct_of_n", "code_pass_rate", "tokens"]


def evaluate_math(task: MathTaskConfig, generator: EvalGenerator, out_dir: str | Path,
                  settings: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[list[str], list]]]:
    """Per-benchmark metrics (plus "average" over benchmarks) and one per-problem table per benchmark.

    `settings` (model, weights, sampling, ...) name the cache file, so changed settings regenerate."""
    results: dict[str, dict[str, Any]] = {}
    tables: dict[str, tuple[list[str], list]] = {}
    tag = settings_hash({**settings, "n_samples": task.n_samples})
    # read every benchmark before generating any, so a bad file or an unreachable hub id fails before hours of work
    benchmarks = {bench: load_benchmark(bench, task.bench_dir, task.bench_paths.get(bench), task.limit)
                  for bench in task.bench}
    for bench, problems in benchmarks.items():
        cache = GenerationCache(Path(out_dir) / "generations" / f"{bench}-{tag}.jsonl")
        todo = [p for p in problems if p.id not in cache]
        batches = [todo[i:i + task.batch_size] for i in range(0, len(todo), task.batch_size)]
        for batch in tqdm(batches, desc=f"{bench} ({len(todo)} to generate)", unit="batch"):
            # the math task's record, prompted as training prompts it (system prompt added by the task)
            solutions = generator.solve([math_record(p.problem) for p in batch], task.n_samples)
            for problem, samples in zip(batch, solutions, strict=True):
                cache.put(problem.id, [sample_record(s) for s in samples])
        per_problem = [[MathSample(**r) for r in cache[p.id]] for p in problems]
        corrects = [judge(samples, p.answer) for samples, p in zip(per_problem, problems, strict=True)]
        results[bench] = {**bench_metrics(per_problem, corrects, task.pass_k), "generated": float(len(todo))}
        rows = []
        for p, samples, correct in zip(problems, per_problem, corrects, strict=True):
            best = best_of_n_index(samples)
            rows.append([p.id, p.answer, samples[best].answer, correct[best], sum(correct),
                         samples[best].code_pass_rate, samples[best].response_tokens])
        tables[f"math/{bench}"] = (TABLE_COLUMNS, rows)
    if len(task.bench) > 1:   # THOR's headline: the unweighted mean over benchmarks
        keys = [k for k in results[task.bench[0]] if k.startswith(("avg@", "pass@", "best_of_n"))]
        results["average"] = {k: sum(results[b][k] for b in task.bench) / len(task.bench) for k in keys}
    return results, tables
