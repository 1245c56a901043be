"""BFCL v3 evaluation: generate, score with bfcl-eval's checkers, aggregate, write BFCL score files.

    results = evaluate_bfcl(["simple", "multiple", "multi_turn_base"], generate_fn, out_dir="logs/bfcl")

`generate_fn(messages) -> str` is any chat model (reasoning included). Generations are cached per id in
`<out_dir>/result/BFCL_v4_<category>_result.json` (JSON lines, as bfcl-eval's result files), so a rerun
resumes where it stopped and re-scores cached entries without generating again.

Aggregation is BFCL v3's leaderboard arithmetic (the v3 `eval_runner_helper.generate_leaderboard_csv`):
non-live = unweighted mean of [simple (mean of python, java, javascript), multiple, parallel,
parallel_multiple, irrelevance]; live = count-weighted mean of its six categories; multi-turn = unweighted
mean of its four; overall = unweighted mean of those three. A category that was not run counts as 0 with its
full size (BFCL does the same and marks it N/A); `complete` says whether every part was run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tirl.benchmarks.bfcl_multiturn import run_multi_turn, score_multi_turn
from tirl.benchmarks.bfcl_score import BFCL_MODEL_NAME, CategoryResult, ItemResult, score_ast
from tirl.benchmarks.results import GenerationCache
from tirl.data.bfcl_files import (
    FILE_PREFIX,
    LIVE,
    MULTI_TURN,
    NON_LIVE,
    BFCLDataError,
    BFCLItem,
    canonical_category,
    category_size,
    load_bfcl,
)
from tirl.data.bfcl_prompt import build_messages, strip_stale_reasoning
from tirl.data.jsonl import write_jsonl

__all__ = [
    "BFCLItem", "CategoryResult", "ItemResult", "build_messages", "evaluate_bfcl", "load_bfcl",
    "run_multi_turn", "score_ast", "score_multi_turn", "strip_stale_reasoning", "summarize",
    "write_score_files",
]

GROUPS = {**{c: "non_live" for c in NON_LIVE}, **{c: "live" for c in LIVE}, **{c: "multi_turn" for c in MULTI_TURN}}


def _part(results: dict[str, CategoryResult], category: str, sizes: dict[str, int]) -> dict[str, Any]:
    if category in results:
        result = results[category]
        return {"accuracy": result.accuracy, "total_count": result.total_count, "ran": True}
    return {"accuracy": 0.0, "total_count": sizes.get(category, 0), "ran": False}


def _unweighted(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"accuracy": sum(p["accuracy"] for p in parts) / len(parts),
            "total_count": sum(p["total_count"] for p in parts), "ran": all(p["ran"] for p in parts)}


def _weighted(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(p["total_count"] for p in parts)
    accuracy = sum(p["accuracy"] * p["total_count"] for p in parts) / total if total else 0.0
    return {"accuracy": accuracy, "total_count": total, "ran": all(p["ran"] for p in parts)}


def summarize(results: dict[str, CategoryResult], category_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """BFCL v3 leaderboard numbers from per-category results (keys are v4 stems)."""
    sizes = category_sizes or {}
    part = {c: _part(results, c, sizes) for c in NON_LIVE + LIVE + MULTI_TURN}
    simple = _unweighted([part["simple_python"], part["simple_java"], part["simple_javascript"]])
    non_live_ast = [simple, part["multiple"], part["parallel"], part["parallel_multiple"]]
    live_ast = [part[c] for c in LIVE[:4]]
    non_live = _unweighted(non_live_ast + [part["irrelevance"]])
    live = _weighted(live_ast + [part["live_irrelevance"], part["live_relevance"]])
    multi_turn = _unweighted([part[c] for c in MULTI_TURN])
    overall = _unweighted([live, non_live, multi_turn])
    return {
        "overall": overall["accuracy"],
        "non_live": non_live["accuracy"],
        "non_live_ast_summary": _unweighted(non_live_ast)["accuracy"],
        "simple_ast": simple["accuracy"],
        "live": live["accuracy"],
        "live_ast_summary": _weighted(live_ast)["accuracy"],
        "multi_turn": multi_turn["accuracy"],
        "irrelevance_total": _unweighted([part["irrelevance"], part["live_irrelevance"]])["accuracy"],
        "relevance_total": part["live_relevance"]["accuracy"],
        "complete": overall["ran"],
        "categories": {c: {"accuracy": r.accuracy, "correct_count": r.correct_count, "total_count": r.total_count}
                       for c, r in results.items()},
    }


def write_score_files(out_dir: str | Path, results: dict[str, CategoryResult],
                      items: dict[str, BFCLItem] | None = None, model_name: str = BFCL_MODEL_NAME) -> list[Path]:
    """BFCL score-file layout: `<out_dir>/<group>/BFCL_v4_<category>_score.json`, JSON lines, the first
    line {"accuracy", "correct_count", "total_count"}, then one line per failed entry."""
    written = []
    for category, result in results.items():
        path = Path(out_dir) / GROUPS[category] / f"{FILE_PREFIX}_{category}_score.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"accuracy": result.accuracy, "correct_count": result.correct_count,
                  "total_count": result.total_count}
        lines = [header] + [r.score_entry((items or {}).get(r.id), model_name) for r in result.items if not r.valid]
        write_jsonl(path, lines)
        written.append(path)
    return written


def evaluate_bfcl(categories: list[str], generate_fn: Callable[[list[dict[str, Any]]], str],
                  source: str | Path = "package", out_dir: str | Path = "bfcl_eval_out",
                  limit: int | None = None, max_steps_per_turn: int = 20) -> dict[str, Any]:
    """Generate (or reuse cached generations), score, write score files; return the summary dict with
    per-category results under "results"."""
    out = Path(out_dir)
    (out / "result").mkdir(parents=True, exist_ok=True)
    results: dict[str, CategoryResult] = {}
    all_items: dict[str, BFCLItem] = {}
    sizes: dict[str, int] = {}
    for name in categories:
        category = canonical_category(name)
        items = load_bfcl(category, source=source, limit=limit)
        all_items.update({item.id: item for item in items})
        cache_path = out / "result" / f"{FILE_PREFIX}_{category}_result.json"
        cache = GenerationCache(cache_path, value_key="result")
        for item in items:
            if item.id not in cache:
                cache.put(item.id, run_multi_turn(item, generate_fn, max_steps_per_turn)["result"]
                          if item.is_multi_turn else generate_fn(build_messages(item)))
        if items and items[0].is_multi_turn:
            verdicts = [(item, score_multi_turn(item, cache[item.id])) for item in items]
            results[category] = CategoryResult(category, [
                ItemResult(item.id, v["valid"], v["error"], v["error_type"], cache[item.id], v["decoded"])
                for item, v in verdicts])
        else:
            results[category] = score_ast(category, items, cache.records)
    for category in NON_LIVE + LIVE + MULTI_TURN:
        try:
            sizes[category] = category_size(category, source)
        except (BFCLDataError, OSError):
            sizes[category] = 0
    write_score_files(out / "score", results, all_items)
    summary = summarize(results, sizes)
    (out / "score" / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["results"] = results
    return summary
