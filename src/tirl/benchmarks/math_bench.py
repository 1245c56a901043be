"""The six math benchmarks of THOR's table, from the Hugging Face hub or a local JSONL/JSON/parquet file.

Field mapping (first key present wins, so a local copy in any of these layouts loads the same way):

| bench         | default hub id (split)              | problem            | answer                      | id          |
|---------------|-------------------------------------|--------------------|-----------------------------|-------------|
| math500       | HuggingFaceH4/MATH-500 (test)       | problem            | answer                      | unique_id   |
| aime24        | HuggingFaceH4/aime_2024 (train)     | problem / Problem  | answer / Answer             | id / ID     |
| aime25        | math-ai/aime25 (test)               | problem            | answer                      | id          |
| amc23         | math-ai/amc23 (test)                | question           | answer                      | id          |
| minerva       | math-ai/minervamath (test)          | question           | answer                      | (row index) |
| olympiadbench | math-ai/olympiadbench (test)        | question           | final_answer (list, joined) | id          |

Maxwell-Jia/AIME_2024 (Problem/Answer/ID) and Hothan/OlympiadBench (question/final_answer) load with the same
mapping. Integer answers (AIME) become strings; a list answer (OlympiadBench) is joined with ", ".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirl.data.jsonl import read_jsonl
from tirl.errors import UserError

PROBLEM_KEYS = ("problem", "Problem", "question", "Question")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "expected_answer")
ID_KEYS = ("unique_id", "id", "ID", "idx")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubSource:
    repo: str
    split: str
    config: str | None = None


DEFAULT_SOURCES: dict[str, HubSource] = {
    "math500": HubSource("HuggingFaceH4/MATH-500", "test"),
    "aime24": HubSource("HuggingFaceH4/aime_2024", "train"),
    "aime25": HubSource("math-ai/aime25", "test"),
    "amc23": HubSource("math-ai/amc23", "test"),
    "minerva": HubSource("math-ai/minervamath", "test"),
    "olympiadbench": HubSource("math-ai/olympiadbench", "test"),
}


class BenchmarkError(UserError, ValueError):
    """A benchmark file or hub id could not be read, or a row lacks a problem or an answer."""


@dataclass
class MathProblem:
    id: str
    bench: str
    problem: str
    answer: str


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _answer_text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v).strip() for v in value)
    return str(value).strip()


def to_problem(bench: str, row: dict[str, Any], index: int, where: str) -> MathProblem:
    """One row in any of the layouts above → MathProblem (BenchmarkError naming `where` if a field is missing)."""
    problem, answer = _first(row, PROBLEM_KEYS), _first(row, ANSWER_KEYS)
    if problem is None or answer is None:
        raise BenchmarkError(f"{where}: row {index} has no problem ({'/'.join(PROBLEM_KEYS)}) or no answer "
                             f"({'/'.join(ANSWER_KEYS)}) field; its keys are {sorted(row)}.")
    row_id = _first(row, ID_KEYS)
    return MathProblem(id=f"{bench}/{row_id if row_id is not None else index}", bench=bench,
                       problem=str(problem), answer=_answer_text(answer))


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = [row for _, row in read_jsonl(path, error=BenchmarkError)]
    return rows


def _read_hub(source: HubSource, bench: str) -> list[dict[str, Any]]:
    try:
        import datasets

        return list(datasets.load_dataset(source.repo, source.config, split=source.split))
    except Exception as err:  # offline, gated, renamed: all end in the same advice
        raise BenchmarkError(
            f"Could not load {bench} from the hub ({source.repo}, split {source.split}: {type(err).__name__}); "
            f"download it where there is network and set task.bench_dir=<dir with {bench}.jsonl> or "
            f"task.bench_paths.{bench}=<file>.") from None


def resolve_source(bench: str, bench_dir: str | None = None, path: str | None = None) -> Path | HubSource:
    """Where a benchmark is read from: its own path override (a file or a hub id), then `bench_dir/<bench>.*`,
    then the default hub id."""
    if path:
        local = Path(path).expanduser()
        if local.suffix in FILE_SUFFIXES or local.exists():
            if not local.is_file():
                raise BenchmarkError(f"Benchmark file '{path}' for {bench} does not exist; fix task.bench_paths.{bench}.")
            return local
        repo, _, split = path.partition(":")   # "owner/name" or "owner/name:split"
        return HubSource(repo, split or "test")
    if bench_dir:
        for suffix in FILE_SUFFIXES:
            candidate = Path(bench_dir).expanduser() / f"{bench}{suffix}"
            if candidate.is_file():
                return candidate
        raise BenchmarkError(f"No {bench}.jsonl, {bench}.json or {bench}.parquet in task.bench_dir={bench_dir}; add "
                             f"it, leave {bench} out of bench=[...], or give its file with task.bench_paths.{bench}=<file>.")
    if bench not in DEFAULT_SOURCES:
        raise BenchmarkError(f"Benchmark '{bench}' has no default source; set task.bench_paths.{bench}=<file>.")
    return DEFAULT_SOURCES[bench]


def load_benchmark(bench: str, bench_dir: str | None = None, path: str | None = None,
                   limit: int | None = None) -> list[MathProblem]:
    """The problems of one benchmark (the first `limit` of them), ids prefixed with the benchmark name."""
    source = resolve_source(bench, bench_dir, path)
    rows = _read_file(source) if isinstance(source, Path) else _read_hub(source, bench)
    rows = rows[:limit] if limit is not None else rows
    problems = [to_problem(bench, row, i, str(source)) for i, row in enumerate(rows)]
    if len({p.id for p in problems}) != len(problems):
        raise BenchmarkError(f"{source}: ids repeat within {bench}; generations are cached per id, so ids must be unique.")
    return problems
