"""Where records come from: JSONL / parquet files, directories of them, HF datasets, synthetic generators.

``load_records(spec)`` returns a ``RecordStream``: iterate it for validated dicts; after (or during) a pass,
``.skipped`` says how many bad records were dropped (with ``on_bad_line="skip"``) so modules can log it.
A bad record with ``on_bad_line="error"`` raises ``DataError`` naming the file and line (or row).

Specs:
- ``path/to/file.jsonl`` (also ``.json`` with one object a line), ``path/to/file.parquet``;
- ``path/to/dir``: every .jsonl/.json/.parquet under it, sorted by path;
- ``hf:org/name`` or ``hf:org/name:split`` (default split ``train``), through ``datasets.load_dataset``;
- ``synthetic:math`` / ``synthetic:toolcall`` with generator options (see ``synthetic_records``);
- ``bfcl:<category>`` or ``bfcl:<category>:<dir>``: official BFCL single-turn items as RL prompts (the
  installed bfcl-eval's files, or a directory with the same layout; see ``tirl.data.bfcl_files``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tirl.data.jsonl import BadLine, scan_jsonl, write_jsonl
from tirl.data.record_checks import record_problem
from tirl.errors import UserError

KINDS = ("sft", "rl", "auto")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
JSON_COLUMNS = ("tools", "answer")  # stored as JSON text in parquet: their shapes differ row to row


class DataError(UserError, ValueError):
    """A data source or record is not usable; the message names where and why."""


# ---------------------------------------------------------------- raw readers: (where, record | error text)


Located = tuple[str, Any]  # ("data/train.jsonl line 17", record) ; record is a _Malformed on parse errors


class _Malformed(str):
    """A line that did not parse; carries the reason."""


def _read_jsonl(path: Path) -> Iterator[Located]:
    for n, value in scan_jsonl(path):
        yield f"{path} line {n}", _Malformed(value.reason) if isinstance(value, BadLine) else value


def _decode_columnar(row: dict) -> dict | _Malformed:
    """A parquet/HF row -> record: None columns are absent fields; tools and tool-call answers stored as
    JSON text are decoded (a math answer is text and stays text, even one like "[0, 1)")."""
    row = {k: v for k, v in row.items() if v is not None}
    json_keys = ["tools"] + (["answer"] if row.get("task") == "toolcall" else [])
    for key in json_keys:
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError:
                form = ' (a toolcall answer is the JSON text of a list like [{"fn": {"arg": [values]}}])' \
                    if key == "answer" else ""
                return _Malformed(f'column "{key}" holds text that is not valid JSON{form}')
    return row


def _read_parquet(path: Path) -> Iterator[Located]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path} is not a readable parquet file ({err}); check the file.") from err
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path} row {n}", _decode_columnar(row)


def _files_under(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise DataError(f"{directory} holds no {'/'.join(FILE_SUFFIXES)} files; point the data config at a file.")
    return files


def _read_path(path: Path) -> Iterator[Located]:
    if not path.exists():
        raise DataError(f"Data file {path} does not exist; check the path (relative paths start at the run's cwd).")
    for file in _files_under(path) if path.is_dir() else [path]:
        if file.suffix == ".parquet":
            yield from _read_parquet(file)
        elif file.suffix in (".jsonl", ".json"):
            yield from _read_jsonl(file)
        else:
            raise DataError(f"{file} has an unknown suffix; use .jsonl, .json or .parquet.")


def _read_hf(spec: str, streaming: bool) -> Iterator[Located]:
    """``hf:org/name[:split]``; a local dataset directory works too (``hf:/path/to/dir:train``)."""
    import datasets

    name, split = spec, "train"
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail:
        name, split = head, tail
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as err:  # hub, network and builder errors come in many types
        raise DataError(f"Could not load HF dataset {name!r} split {split!r} ({type(err).__name__}: {err}); "
                        "check the id, the split and network access.") from err
    for n, row in enumerate(dataset, 1):
        yield f"hf:{name}:{split} row {n}", _decode_columnar(dict(row))


# ---------------------------------------------------------------- synthetic


def synthetic_records(name: str, seed: int = 0, options: dict | None = None, sandbox: Any = None) -> Iterator[dict]:
    """Records of a synthetic task. Options (all optional):

    ``format``: "rl" (prompts, default) or "sft" (samples; math needs ``sandbox``); ``size``: how many
    (default: unlimited for rl, 1000 for sft); ``split``: "train", its halves "sft" / "rl", or "heldout"; math ``levels`` (1-4);
    toolcall ``categories``, ``max_tools``, ``max_calls``.
    """
    from tirl.data import synthetic_math, synthetic_toolcall

    options = dict(options or {})
    fmt = options.pop("format", "rl")
    size = options.pop("size", None)
    split = options.pop("split", "train")
    if name == "math":
        generator_keys = {"levels"}
    elif name == "toolcall":
        generator_keys = {"categories", "max_tools", "max_calls"}
    else:
        raise DataError(f"Unknown synthetic task 'synthetic:{name}'; use synthetic:math or synthetic:toolcall.")
    unknown = set(options) - generator_keys
    if unknown or fmt not in ("rl", "sft"):
        raise DataError(f"synthetic:{name} takes options format (rl|sft), size, split and {sorted(generator_keys)}; "
                        f"got unknown {sorted(unknown) or fmt!r}.")
    if "levels" in options:
        options["levels"] = tuple(options["levels"])
    if "categories" in options:
        options["categories"] = tuple(options["categories"])
    if fmt == "sft":
        n = 1000 if size is None else int(size)
        if name == "math":
            yield from synthetic_math.make_math_sft_samples(n, seed, sandbox=sandbox, split=split, **options)
        else:
            yield from synthetic_toolcall.make_toolcall_sft_samples(n, seed, split=split, **options)
        return
    make: Callable[..., list[dict]] = (synthetic_math.make_math_rl_prompts if name == "math"
                                       else synthetic_toolcall.make_toolcall_rl_prompts)
    if size is not None:
        yield from make(int(size), seed, split=split, **options)
        return
    start = 0
    while True:  # unlimited: generate in chunks
        yield from make(256, seed, split=split, start=start, **options)
        start += 256


def _read_bfcl(spec: str) -> Iterator[Located]:
    """BFCL single-turn items as RL prompts: BFCL's system prompt + question, possible answers as gold."""
    from tirl.data.bfcl_files import BFCLDataError, load_bfcl
    from tirl.data.bfcl_prompt import build_messages

    category, _, source = spec.partition(":")
    if category.startswith("multi_turn"):
        raise DataError(f"bfcl:{category} is multi-turn and has no single RL prompt; evaluate it with tirl.benchmarks.bfcl.")
    try:
        items = load_bfcl(category, source or "package")
    except BFCLDataError as err:
        raise DataError(str(err)) from err
    for n, item in enumerate(items, 1):
        # BFCL's own prompting-mode system prompt lists the functions (as BFCL evaluation shows them): the task prompt
        # must not list them again, but the reward types arguments by these docs, as BFCL's checker does
        record = {"id": item.id, "task": "toolcall", "messages": build_messages(item), "tools": item.functions,
                  "tools_in_messages": True, "answer": item.ground_truth or [], "category": item.category}
        yield f"bfcl:{category} item {n}", record


# ---------------------------------------------------------------- the stream


class RecordStream:
    """Validated records of one source; iterate as often as needed. ``skipped`` counts the last pass's drops."""

    def __init__(self, spec: str | Path, on_bad_line: str = "error", streaming: bool = False, kind: str = "auto",
                 seed: int = 0, synthetic: dict | None = None, sandbox: Any = None) -> None:
        if on_bad_line not in ("error", "skip"):
            raise DataError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}.")
        if kind not in KINDS:
            raise DataError(f"kind must be one of {list(KINDS)}, got {kind!r}.")
        self.spec, self.on_bad_line, self.streaming, self.kind = str(spec), on_bad_line, streaming, kind
        self.seed, self.synthetic, self.sandbox = seed, synthetic, sandbox
        self.skipped = 0

    @property
    def is_synthetic(self) -> bool:
        return self.spec.startswith("synthetic:")

    def _located(self) -> Iterator[Located]:
        if self.is_synthetic:
            name = self.spec.removeprefix("synthetic:")
            for n, record in enumerate(synthetic_records(name, self.seed, self.synthetic, self.sandbox), 1):
                yield f"{self.spec} record {n}", record
        elif self.spec.startswith("bfcl:"):
            yield from _read_bfcl(self.spec.removeprefix("bfcl:"))
        elif self.spec.startswith("hf:"):
            yield from _read_hf(self.spec.removeprefix("hf:"), self.streaming)
        else:
            yield from _read_path(Path(self.spec))

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        for where, record in self._located():
            problem = str(record) if isinstance(record, _Malformed) else record_problem(record, self.kind)
            if problem is None:
                yield record
            elif self.on_bad_line == "skip":
                self.skipped += 1
            else:
                raise DataError(f"{where}: {problem}; fix or remove it, or set data.on_bad_line=skip.")


def load_records(spec: str | Path, on_bad_line: str = "error", streaming: bool = False, kind: str = "auto",
                 seed: int = 0, synthetic: dict | None = None, sandbox: Any = None) -> RecordStream:
    """Records of ``spec`` (see module doc), validated against the SFT or RL contract (``kind``)."""
    return RecordStream(spec, on_bad_line, streaming, kind, seed, synthetic, sandbox)


def write_records(path: str | Path, records: list[dict]) -> Path:
    """Write records as JSONL or parquet (by suffix); parquet stores tools and non-text answers as JSON text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(k for r in records for k in r))  # every key of every record, in order
        rows = [{k: json.dumps(r[k]) if k in JSON_COLUMNS and not isinstance(r.get(k, ""), str) else r.get(k)
                 for k in columns} for r in records]
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix in (".jsonl", ".json"):
        write_jsonl(path, records)
    else:
        raise DataError(f"Cannot write {path}: use a .jsonl or .parquet suffix.")
    return path
