"""Run a per-item job over records: resumable, concurrent within a bound, atomic, with a progress bar.

Each finished item is one line appended (and fsynced) to ``<out>.progress.jsonl``: its id, status
(kept / dropped / error), drop reason and output samples. That file is the resume index: a rerun skips ids
already kept or dropped (errors are retried), and a crash loses at most the items in flight. When every item is
done, the output JSONL is written in input order (so thread scheduling never changes it) to a temporary file
and moved into place with ``os.replace``; the same for the report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tirl.data.jsonl import JsonlAppender, read_jsonl
from tirl.pipelines.chat_backends import ChatBackendError


@dataclass
class ItemResult:
    status: str                                  # "kept" | "dropped" | "error"
    reason: str = ""                             # drop reason or error kind
    samples: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)     # per-item facts the report aggregates (e.g. code-call counts)


class DuplicateIdError(ValueError):
    """Two input records share an id; resuming needs ids to be unique."""


def progress_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".progress.jsonl")


def load_progress(path: Path) -> dict[str, dict]:
    """id → its last finished record; a torn last line (crash mid-write) is ignored, errors are not 'finished'."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for _, rec in read_jsonl(path, torn_tail_ok=True):
        if rec.get("status") == "error":
            done.pop(rec["id"], None)
        else:
            done[rec["id"]] = rec
    return done


def run_items(records: list[dict], process: Callable[[dict], ItemResult], out_path: str | Path,
              max_concurrency: int = 4, desc: str = "items", show_progress: bool = True) -> list[dict]:
    """Process every record not yet finished; return the finished records (id, status, reason, samples, info)
    in input order. The caller turns them into the output file (``finish``)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = [str(r["id"]) for r in records]
    dup = [i for i, c in Counter(ids).items() if c > 1]
    if dup:
        raise DuplicateIdError(f"Input ids must be unique to resume; repeated: {dup[:5]}. Give each record its own 'id'.")
    done = load_progress(progress_path(out_path))
    todo = [r for r in records if str(r["id"]) not in done]
    counts = Counter(rec["status"] for rec in done.values() if rec["id"] in set(ids))
    log = JsonlAppender(progress_path(out_path))
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=desc, disable=not show_progress,
               dynamic_ncols=True)
    bar.set_postfix(kept=counts["kept"], dropped=counts["dropped"], error=counts["error"])

    def one(record: dict) -> dict:
        try:
            result = process(record)
        except ChatBackendError as err:  # a backend that failed for good: counted, retried on the next run
            result = ItemResult("error", err.kind)
        except Exception as err:  # a bug or bad record must not take the other items down; it is counted
            result = ItemResult("error", f"exception:{type(err).__name__}", info={"message": str(err)[:500]})
        rec = {"id": str(record["id"]), "status": result.status, "reason": result.reason,
               "samples": result.samples, "info": result.info}
        log.append(rec)
        return rec

    errors: dict[str, dict] = {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, max_concurrency)) as pool:
            pending = set()
            queue = iter(todo)
            for record in queue:  # keep at most max_concurrency in flight: a crash loses only those
                pending.add(pool.submit(one, record))
                if len(pending) >= max_concurrency:
                    break
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    rec = fut.result()  # a BaseException (KeyboardInterrupt, a simulated crash) propagates
                    counts[rec["status"]] += 1
                    (errors.__setitem__(rec["id"], rec) if rec["status"] == "error" else done.__setitem__(rec["id"], rec))
                    bar.update(1)
                    bar.set_postfix(kept=counts["kept"], dropped=counts["dropped"], error=counts["error"])
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.add(pool.submit(one, nxt))
    finally:
        bar.close()
        log.close()
    return [done.get(i) or errors[i] for i in ids]


def drop_counts(finished: list[dict]) -> dict:
    """Totals for a report: items by status and every drop/error reason counted."""
    status = Counter(r["status"] for r in finished)
    reasons = Counter(r["reason"] for r in finished if r["status"] == "dropped")
    errors = Counter(r["reason"] for r in finished if r["status"] == "error")
    n = len(finished)
    return {"items": n, "kept": status["kept"], "dropped": status["dropped"], "errors": status["error"],
            "keep_rate": status["kept"] / n if n else 0.0,
            "drop_reasons": dict(sorted(reasons.items())), "error_kinds": dict(sorted(errors.items()))}
