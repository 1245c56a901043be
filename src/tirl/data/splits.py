"""What both datamodules share: their constructor's checks, where a synthetic source's options go, and how a
file train source gives records to validation (``heldout_count``)."""

from __future__ import annotations

import difflib
import logging
import random
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from tirl.data.sources import DataError

log = logging.getLogger(__name__)

DATA_CONFIG_FIELDS = ("train", "val", "test", "batch_size", "num_workers", "max_length", "seed", "on_bad_line",
                      "synthetic", "streaming", "packing", "val_size")
SYNTHETIC_TASKS = ("math", "toolcall")


def _reject_unknown(owner: str, unknown: dict, valid: tuple[str, ...]) -> None:
    if not unknown:
        return
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise DataError(f"{owner} got unknown option(s) {', '.join(parts)}; valid options are {list(valid)}.")


def _synthetic_name(spec: Any) -> str | None:
    if isinstance(spec, str) and spec.startswith("synthetic:"):
        name = spec.removeprefix("synthetic:")
        if name not in SYNTHETIC_TASKS:
            raise DataError(f"Unknown synthetic task '{spec}'; use synthetic:math or synthetic:toolcall.")
        return name
    return None


GENERATOR_KEYS = {"math": ("levels",), "toolcall": ("categories", "max_tools", "max_calls")}


def _generator_options(options: dict | None, name: str | None = None) -> dict:
    """The synthetic options a generator takes (size/format/split are decided by the datamodule). data.synthetic is
    one typed schema for both tasks, so a given task ignores the other task's options (names are checked there)."""
    kept = {k: v for k, v in dict(options or {}).items() if k not in ("size", "format", "split")}
    return kept if name not in GENERATOR_KEYS else {k: v for k, v in kept.items() if k in GENERATOR_KEYS[name]}


TRAIN_SPLITS = ("train", "sft", "rl")


def _train_split(options: dict) -> str:
    """``data.synthetic.split``: which part of a synthetic stream trains: ``train`` (all but the held-out ~10%), or
    one of its two disjoint halves, ``sft`` and ``rl``. Val/test always come from ``heldout``."""
    split = options.get("split") or "train"
    if split not in TRAIN_SPLITS:
        raise DataError(f"data.synthetic.split must be one of {list(TRAIN_SPLITS)} (val/test are always the held-out "
                        f"split), got {split!r}.")
    return split


MAX_HELDOUT_FRACTION = 0.2   # a train file gives at most a fifth of its records to validation


def heldout_count(n_records: int, val_size: int) -> int:
    """How many of a train file's ``n_records`` are held out for validation: ``val_size``, capped at a fifth of the
    file so a small file still trains (10 records → 2 held out, fewer than 5 → none)."""
    return max(0, min(val_size, int(n_records * MAX_HELDOUT_FRACTION)))


def _split_off(records: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held) with up to ``n`` records held out by a seeded shuffle (see ``heldout_count``); order of the
    rest is kept. A one-line notice says when the cap applies."""
    wanted, n = n, heldout_count(len(records), n)
    if n < wanted:
        what = f"holding out {n} (a fifth)" if n else "too few to hold any out, so there is no validation"
        log.warning("data.val_size=%d but the train file has %d records: %s; give data.val=<file> for a separate "
                    "validation set.", wanted, len(records), what)
    if n == 0:
        return list(records), []
    held = set(random.Random(f"tirl-holdout:{seed}").sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# ====================================================================== SFT


class _ListDataset(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _trainer_layout(dm: LightningDataModule) -> tuple[int, int, int, int]:
    """(accumulate_grad_batches, rank, world_size, epoch) of the trainer running ``dm``; (1, 0, 1, 0) without one."""
    trainer = getattr(dm, "trainer", None)
    if trainer is None:
        return 1, 0, 1, 0
    return int(trainer.accumulate_grad_batches), trainer.global_rank, trainer.world_size, trainer.current_epoch
