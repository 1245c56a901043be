"""JSON-lines files, read and written one way everywhere: data sources, pipeline inputs and progress logs,
evaluation caches, BFCL's data and result files.

Reading names the file and line of a line that does not parse (``data/train.jsonl:17: not valid JSON ...``);
blank lines are skipped. A last line without its newline is what a killed append leaves: readers of files that
are appended to (progress logs, caches) pass ``torn_tail_ok=True`` to ignore it, every other bad line is an error.
Appending writes whole lines, flushed and fsynced, so a crash loses at most the line in flight; whole files are
written to a temporary name and moved into place (``os.replace``), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tirl.errors import UserError


class JsonlError(UserError, ValueError):
    """A line of a JSON-lines file does not parse; the message names file and line."""


@dataclass(frozen=True)
class BadLine:
    """A line that did not parse: where it is, why, and whether it is a torn tail (the file's last line, no
    newline: a killed append)."""

    path: Path
    line: int
    reason: str
    torn: bool

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def scan_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, decoded value or a ``BadLine``) for each non-blank line, never raising on a bad
    line: for readers that decide per line (``data.on_bad_line=skip`` counts and skips)."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, BadLine(path, number, f"not valid JSON ({err.msg} at column {err.colno})",
                                      torn=not line.endswith("\n"))


def read_jsonl(path: str | Path, *, torn_tail_ok: bool = False,
               error: type[Exception] = JsonlError) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line. Raises ``error`` (a ``UserError`` subclass of the caller's
    domain, default ``JsonlError``) at the first line that does not parse, naming file and line; with
    ``torn_tail_ok`` a torn last line is skipped instead. A missing file raises ``FileNotFoundError``."""
    for number, value in scan_jsonl(path):
        if isinstance(value, BadLine):
            if torn_tail_ok and value.torn:
                continue
            raise error(f"{value}; fix or remove that line.")
        yield number, value


def dumps_line(record: Any) -> str:
    """One record as one JSONL line (UTF-8 kept readable, newline included)."""
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


class JsonlAppender:
    """An open JSON-lines file that whole records are appended to, each flushed and fsynced before ``append``
    returns; safe to share between threads. Use as a context manager or ``close()`` it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def append(self, record: Any) -> None:
        with self._lock:
            self._file.write(dumps_line(record))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """The whole file at once, atomically (``write_atomic``)."""
    write_atomic(path, "".join(dumps_line(r) for r in records))
