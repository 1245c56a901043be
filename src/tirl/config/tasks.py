"""Which task a run's prompts hold and which reward scores it: the data decides, the method may override.

A data group declares ``data.task`` (``math`` | ``toolcall``); a source whose name tells its task
(``synthetic:math``, ``bfcl:<category>``) or a local JSONL file whose first record has a ``task`` field says it
too. ``method.reward.name`` left at null becomes the task's reward (``TASK_REWARDS``) when the config is validated;
a method or the command line may name another (``method.reward.name=toolcall_exact``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The reward that scores each task by default (names registered in tirl.rewards).
TASK_REWARDS: dict[str, str] = {"math": "math", "toolcall": "toolcall"}
# The task each registered reward scores.
REWARD_TASKS: dict[str, str] = {"math": "math", "toolcall": "toolcall", "toolcall_exact": "toolcall"}
TASKS: tuple[str, ...] = tuple(TASK_REWARDS)


def source_task(spec: Any) -> str | None:
    """The task of a data source whose kind its name tells: ``synthetic:math`` → math, ``synthetic:toolcall`` and
    ``bfcl:<category>`` → toolcall; None for files and HF datasets (their records say)."""
    if not isinstance(spec, str):
        return None
    if spec.startswith("synthetic:"):
        name = spec.removeprefix("synthetic:")
        return name if name in TASKS else None
    return "toolcall" if spec.startswith("bfcl:") else None


def is_local_path(spec: Any) -> bool:
    """A data source that names a file or directory (everything but ``synthetic:``, ``bfcl:`` and ``hf:`` specs)."""
    return isinstance(spec, str) and not spec.startswith(("synthetic:", "bfcl:", "hf:"))


def records_task(spec: Any) -> str | None:
    """The ``task`` field of the first record of a local ``.jsonl`` file; None for anything else (a missing file,
    parquet, a directory, an HF id, a first line that is not a JSON object with a known task)."""
    if not is_local_path(spec) or not str(spec).endswith(".jsonl"):
        return None
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return None   # the datamodule reports the bad line with file and line number
                task = record.get("task") if isinstance(record, dict) else None
                return task if task in TASKS else None
    return None


def data_task(data: Any) -> str | None:
    """The task of a ``DataConfig``: ``data.task`` if set, else what its sources' names or records say (None: unknown)."""
    if data.task is not None:
        return data.task
    for split in ("train", "val", "test"):
        task = source_task(getattr(data, split))
        if task is not None:
            return task
    return records_task(data.train)
