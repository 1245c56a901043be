"""The BFCL task: batched generation of single-turn answers into evaluate_bfcl's cache, then evaluate_bfcl
(multi-turn entries drive the model step by step), then D-CORE's lazy-reasoning ratio per group.

Lazy ratio per group: every model response is one trace, judged with its entry's verdict (a multi-turn entry
contributes one trace per step). Groups: parallel (parallel, parallel_multiple and their live versions),
irrelevance (irrelevance, live_irrelevance), multi_turn (the four multi-turn categories); a group none of
whose categories ran is left out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tirl.benchmarks.bfcl import evaluate_bfcl
from tirl.benchmarks.bfcl_score import CategoryResult
from tirl.benchmarks.generate import EvalGenerator
from tirl.benchmarks.lazy import lazy_ratio
from tirl.benchmarks.results import GenerationCache
from tirl.benchmarks.task_config import BFCLTaskConfig
from tirl.data.bfcl_files import FILE_PREFIX, MULTI_TURN, canonical_category, load_bfcl
from tirl.data.bfcl_prompt import build_messages

LAZY_GROUPS = {
    "parallel": ["parallel", "parallel_multiple", "live_parallel", "live_parallel_multiple"],
    "irrelevance": ["irrelevance", "live_irrelevance"],
    "multi_turn": MULTI_TURN,
}
TABLE_COLUMNS = ["id", "category", "valid", "error_type", "response"]


def pregenerate_single_turn(task: BFCLTaskConfig, generator: EvalGenerator, out_dir: Path) -> int:
    """Generate every uncached single-turn entry in batches, appended to evaluate_bfcl's per-category cache
    (`result/BFCL_v4_<category>_result.json`, {"id", "result"} lines); returns how many were generated."""
    generated = 0
    for name in task.categories:
        category = canonical_category(name)
        cache = GenerationCache(out_dir / "result" / f"{FILE_PREFIX}_{category}_result.json", value_key="result")
        todo = [i for i in load_bfcl(category, task.source, task.limit) if not i.is_multi_turn and i.id not in cache]
        batches = [todo[i:i + task.batch_size] for i in range(0, len(todo), task.batch_size)]
        for batch in tqdm(batches, desc=f"{category} ({len(todo)} to generate)", unit="batch"):
            texts = generator.chat([build_messages(item) for item in batch])
            for item, (text, _) in zip(batch, texts, strict=True):
                cache.put(item.id, text)
            generated += len(batch)
    return generated


def lazy_by_group(results: dict[str, CategoryResult], length: Any, min_reasoning_tokens: int = 200,
                  min_reflective: int = 3) -> dict[str, float]:
    """Lazy-reasoning ratio of each group that ran (see the module docstring)."""
    ratios = {}
    for group, categories in LAZY_GROUPS.items():
        traces: list[str] = []
        verdicts: list[bool] = []
        for category in categories:
            for item in results[category].items if category in results else []:
                raw = item.model_result_raw
                steps = [s for turn in raw for s in turn] if isinstance(raw, list) else [raw]
                traces += [str(s) for s in steps]
                verdicts += [item.valid] * len(steps)
        if traces:
            ratios[group] = lazy_ratio(traces, verdicts, length, min_reasoning_tokens, min_reflective)
    return ratios


def evaluate_bfcl_task(task: BFCLTaskConfig, generator: EvalGenerator, out_dir: str | Path,
                       length: Any) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[list[str], list]], dict[str, Any]]:
    """(per-category and summary metrics in %, per-entry tables, BFCL's summary dict)."""
    out = Path(out_dir)
    generated = pregenerate_single_turn(task, generator, out)
    steps = tqdm(desc="multi-turn steps", unit="step", disable=not any("multi_turn" in c for c in task.categories))

    def generate_fn(messages: list[dict[str, Any]]) -> str:   # multi-turn steps (single-turn is cached by now)
        steps.update(1)
        return generator.chat([messages])[0][0]

    summary = evaluate_bfcl(task.categories, generate_fn, task.source, out, task.limit, task.max_steps_per_turn)
    steps.close()
    category_results: dict[str, CategoryResult] = summary.pop("results")
    results = {c: {"accuracy": 100.0 * r["accuracy"], "correct": r["correct_count"], "total": r["total_count"]}
               for c, r in summary["categories"].items()}
    lazy = lazy_by_group(category_results, length, task.lazy_min_reasoning_tokens, task.lazy_min_reflective)
    headline = {k: 100.0 * v for k, v in summary.items() if isinstance(v, float)}
    headline.update({f"lazy_ratio/{g}": 100.0 * r for g, r in lazy.items()})
    headline["generated"] = float(generated + steps.n)
    headline["complete"] = float(summary["complete"])
    results["summary"] = headline
    rows = [[i.id, c, i.valid, i.error_type, json.dumps(i.model_result_raw, ensure_ascii=False)[:2000]]
            for c, r in category_results.items() for i in r.items]
    return results, {"bfcl/entries": (TABLE_COLUMNS, rows)}, {**summary, "lazy_ratio": lazy}


def length_fn(tokenizer: Any) -> Callable[[str], int]:
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
