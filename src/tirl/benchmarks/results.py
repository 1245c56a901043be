"""Where evaluation results go: a per-id generation cache (so a rerun resumes), JSON, a markdown table, loggers.

The cache is a JSON-lines file of {"id", "record"} (bfcl-eval's result files: {"id", "result"}); a line torn by a
killed run is ignored, anything else that does not parse is an error naming file and line. Its file name carries a hash of everything that changes what
would be generated (model, weights, sampling, self-correction, n), so a run with other settings never reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tirl.data.jsonl import JsonlAppender, read_jsonl
from tirl.errors import UserError

log = logging.getLogger(__name__)


class CacheError(UserError, ValueError):
    """A generation cache file holds a line that is not an {"id", "record"} JSON object."""


def settings_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of generation settings (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


class GenerationCache:
    """Append-only per-id store of generations: a JSON-lines file of ``{"id", <value_key>}`` objects, each line
    fsynced as it is written, so a killed run resumes where it stopped. ``value_key`` is "record" for the math
    task's caches and "result" for bfcl-eval's result files (the same file bfcl-eval itself would write)."""

    def __init__(self, path: str | Path, value_key: str = "record") -> None:
        self.path = Path(path)
        self.value_key = value_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, Any] = {}
        if self.path.is_file():
            for line_no, row in read_jsonl(self.path, torn_tail_ok=True, error=CacheError):
                if not (isinstance(row, dict) and "id" in row and value_key in row):
                    raise CacheError(f"{self.path}:{line_no}: not an {{'id', '{value_key}'}} JSON line; "
                                     "delete the file to regenerate.")
                self.records[row["id"]] = row[value_key]

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def __getitem__(self, item_id: str) -> Any:
        return self.records[item_id]

    def __len__(self) -> int:
        return len(self.records)

    def put(self, item_id: str, record: Any) -> None:
        self.records[item_id] = record
        with JsonlAppender(self.path) as out:
            out.append({"id": item_id, self.value_key: record})


def flat_metrics(results: dict[str, dict[str, Any]], prefix: str = "test") -> dict[str, float]:
    """{"math500": {"avg@4": 12.5}} → {"test/math500/avg@4": 12.5} (numbers only)."""
    return {f"{prefix}/{name}/{key}": float(value) for name, values in results.items()
            for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def markdown_table(results: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """One row per benchmark/category, the given metric columns (missing ones blank), numbers to 2 decimals."""
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| name | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(values.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, stem: str, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    md_path.write_text(table, encoding="utf-8")
    return json_path, md_path


def log_to_loggers(loggers: list[Any], metrics: dict[str, float], tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
    """Metrics to every Lightning logger; on W&B also the run summary and one table per entry of `tables`."""
    for logger in loggers:
        logger.log_metrics(metrics, step=0)
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(metrics)
            for key, (columns, rows) in tables.items():
                logger.log_table(key=key, columns=columns, data=rows)
        logger.save()
