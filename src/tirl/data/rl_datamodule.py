"""The RL DataModule: endless seeded streams of RL prompts (synthetic, shuffled file, or sequential stream),
split over ranks, resumable, with prompts to refill dropped groups (dynamic sampling). Validation and test sets as
``tirl.data.datamodules`` describes."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from tirl.data.collate import (
    collate_prompts,
)
from tirl.data.prompts import PromptEncoder
from tirl.data.sources import DataError, RecordStream, load_records
from tirl.data.splits import (
    DATA_CONFIG_FIELDS,
    _generator_options,
    _ListDataset,
    _reject_unknown,
    _split_off,
    _synthetic_name,
    _train_split,
)
from tirl.data.synthetic_math import math_rl_prompt, problem_at
from tirl.data.synthetic_toolcall import task_at, toolcall_rl_prompt

log = logging.getLogger(__name__)


class PromptBatch(list):
    """A list of prompt records that remembers where in the train stream it came from."""

    index: int = -1  # global batch number, -1 for val/test batches


class _SyntheticPrompts:
    """Random access into a synthetic stream: position -> prompt (pure, so resumable). Endless by default; with
    ``size`` (``data.synthetic.size``) the first ``size`` prompts, cycled."""

    def __init__(self, name: str, seed: int, options: dict, size: int | None = None, split: str = "train") -> None:
        if size is not None and size < 1:
            raise DataError(f"data.synthetic.size must be at least 1 (or null for an endless stream), got {size}.")
        self.name, self.seed, self.options, self.size, self.split = name, seed, options, size, split

    def at(self, position: int, refill: bool = False) -> dict:
        if self.size is not None:
            # a finite set: batches cycle through it forwards, refills backwards, so a refill is rarely the prompt
            # it replaces
            index = (self.size - 1 - position % self.size) if refill else position % self.size
            tag = str(index)   # one prompt, one id, however it was drawn
        else:
            # refills draw from negative indices: a stream of their own that never meets the batches'
            index = -(position + 1) if refill else position
            tag = f"r{position}" if refill else str(position)
        if self.name == "math":
            return math_rl_prompt(problem_at(self.seed, index, split=self.split, **self.options),
                                  f"math-{self.split}-{self.seed}-{tag}")
        return toolcall_rl_prompt(task_at(self.seed, index, split=self.split, **self.options),
                                  f"toolcall-{self.split}-{self.seed}-{tag}")


class _ShuffledPrompts:
    """A finite record list, reshuffled every epoch by a seeded permutation: position -> record."""

    def __init__(self, records: list[dict], seed: int) -> None:
        if not records:
            raise DataError("The RL train source has no usable prompts; check data.train.")
        self.records, self.seed = records, seed
        self._perms: dict[tuple[int, bool], list[int]] = {}

    def at(self, position: int, refill: bool = False) -> dict:
        epoch, i = divmod(position, len(self.records))
        key = (epoch, refill)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            perm = list(range(len(self.records)))
            random.Random(f"tirl-epoch:{self.seed}:{epoch}:{refill}").shuffle(perm)
            self._perms[key] = perm
        return self.records[self._perms[key][i]]


class _SequentialPrompts:
    """A streamed source read in order (cycling); random access by re-reading forward from the start."""

    def __init__(self, stream: RecordStream) -> None:
        self.stream = stream
        self._iters: dict[bool, tuple[Iterator[dict], int]] = {}
        self._size: int | None = None

    def at(self, position: int, refill: bool = False) -> dict:
        if self._size:
            position %= self._size
        it, pos = self._iters.get(refill, (None, 0))
        if it is None or pos > position:
            it, pos = iter(self.stream), 0
        while True:
            try:
                record = next(it)
            except StopIteration:
                if pos == 0:
                    raise DataError(f"The RL train source {self.stream.spec} has no usable prompts.") from None
                self._size = pos
                self._iters.pop(refill, None)
                return self.at(position % pos, refill)
            pos += 1
            if pos - 1 == position:
                self._iters[refill] = (it, pos)
                return record


class _NoTrainSource:
    def at(self, position: int, refill: bool = False) -> dict:
        raise DataError("This run has no training prompts; set data.train to train, or only run evaluation.")


class _TrainPromptStream(IterableDataset):
    """Endless batches: global batch b on rank r holds positions [(b*world + r)*B, +B) of the train source."""

    def __init__(self, dm: RLPromptDataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[PromptBatch]:
        b = self.dm._next_batch
        while True:
            yield self.dm._batch(b)
            b += 1


def _identity(batch):
    return batch


class RLPromptDataModule(LightningDataModule):
    """Lists of RL prompt records for the RL modules (they render and roll out): no tensors here.

    Train: an endless, seeded stream (synthetic generators, or file records reshuffled each epoch). The
    position of the next batch the model has not trained on is ``state_dict()["next_batch"]``; Lightning saves
    it in checkpoints and a resumed run continues with the same next prompts. ``refill_prompts(n)`` (THOR's
    dynamic sampling) draws from a separate stream so it never shifts the batches. Val/test: fixed lists.
    ``max_length``: train prompts whose rendered length exceeds it are dropped (counted in ``self.too_long``);
    val/test prompts are only counted.
    """

    def __init__(self, tokenizer=None, train: Any = None, val: Any = None, test: Any = None, batch_size: int = 4,
                 num_workers: int = 0, max_length: int = 512, seed: int = 0, on_bad_line: str = "error",
                 synthetic: dict | None = None, streaming: bool = False, packing: bool = False, val_size: int = 64,
                 enable_thinking: bool = True, tool_prompt: str = "system", **unknown) -> None:
        super().__init__()
        _reject_unknown("RLPromptDataModule", unknown,
                        DATA_CONFIG_FIELDS + ("tokenizer", "enable_thinking", "tool_prompt"))
        if train is None and test is None:
            raise DataError("RLPromptDataModule needs data.train (a file, directory, hf: id or synthetic:math|toolcall) "
                            "or, for evaluation only, data.test.")
        if packing:
            raise DataError("data.packing applies to SFT only; set it to false for RL prompts.")
        if batch_size < 1:
            raise DataError(f"data.batch_size must be at least 1, got {batch_size}.")
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, enable_thinking, tool_prompt) if tokenizer is not None else None
        self.train_spec, self.val_spec, self.test_spec = train, val, test
        self.batch_size, self.num_workers, self.max_length, self.seed = batch_size, num_workers, max_length, seed
        self.on_bad_line, self.synthetic, self.streaming = on_bad_line, dict(synthetic or {}), streaming
        self.val_size = val_size
        self.skipped = 0
        self.too_long = 0
        self._next_batch = 0  # first global batch not yet trained on
        self._refills = 0  # refill prompts drawn on this rank
        self._source: Any = None
        self.val_records: list[dict] = []
        self.test_records: list[dict] = []

    # -------------------------------------------------------------- sources
    def prompt_length(self, record: dict) -> int:
        """Tokens of the record's prompt as the RL module renders it (``tirl.data.prompts.PromptEncoder``)."""
        return self.prompts.length(record)

    def _fits(self, record: dict) -> bool:
        if self.tokenizer is None or self.prompt_length(record) <= self.max_length:
            return True
        self.too_long += 1
        return False

    def _load(self, spec: Any, drop_long: bool = True) -> list[dict]:
        stream = load_records(spec, self.on_bad_line, self.streaming, kind="rl")
        records = [r for r in stream if self._fits(r) or not drop_long]
        self.skipped += stream.skipped
        if stream.skipped:
            log.warning("Skipped %d bad records in %s.", stream.skipped, spec)
        return records

    def _heldout(self, spec: Any, start: int) -> list[dict]:
        """Held-out synthetic prompts ``start .. start+val_size-1``; over-long ones are counted, not dropped."""
        options = {**_generator_options(self.synthetic, _synthetic_name(spec)), "size": start + self.val_size,
                   "split": "heldout"}
        records = list(load_records(spec, kind="rl", seed=self.seed, synthetic=options))[start:]
        for r in records:
            self._fits(r)
        return records

    def setup(self, stage: str | None = None) -> None:
        if self._source is not None:
            return
        name = _synthetic_name(self.train_spec)
        val = None
        if self.train_spec is None:  # evaluation only
            self._source = _NoTrainSource()
        elif name is not None:
            self._source = _SyntheticPrompts(name, self.seed, _generator_options(self.synthetic, name),
                                             self.synthetic.get("size"), _train_split(self.synthetic))
            self._source.at(0)  # fail now, not mid-run, on bad generator options
        elif self.streaming:
            self._source = _SequentialPrompts(load_records(self.train_spec, self.on_bad_line, True, kind="rl"))
        else:
            records = self._load(self.train_spec)
            if self.val_spec is None and self.val_size > 0:
                records, val = _split_off(records, self.val_size, self.seed)
            self._source = _ShuffledPrompts(records, self.seed)
        # a synthetic train source brings its own held-out val/test sets
        val_spec = self.val_spec if self.val_spec is not None else (self.train_spec if name else None)
        test_spec = self.test_spec if self.test_spec is not None else (self.train_spec if name else None)
        self.val_records = self._fixed(val_spec, 0) if val_spec is not None else (val or [])
        self.test_records = self._fixed(test_spec, self.val_size) if test_spec is not None else []
        if self.too_long:
            log.warning("%d prompts are longer than max_length=%d: dropped from train, kept (and truncated by "
                        "the rollout) in val/test so benchmark totals stay whole.", self.too_long, self.max_length)

    def _fixed(self, spec: Any, start: int) -> list[dict]:
        """A val/test set; over-long prompts are counted but kept (dropping them would change scores)."""
        return self._heldout(spec, start) if _synthetic_name(spec) else self._load(spec, drop_long=False)

    # -------------------------------------------------------------- the train stream
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _batch(self, b: int) -> PromptBatch:
        """Global batch ``b`` is ``batch_size`` prompts over all ranks (``method.rollout_batch_size``); this rank
        takes its contiguous share of ``batch_size / world_size``."""
        rank, world = self._rank()
        if self.batch_size % world:
            raise DataError(f"data.batch_size={self.batch_size} (method.rollout_batch_size: prompts per round over all "
                            f"ranks) must be a multiple of the {world} training processes; change one of them.")
        per_rank = self.batch_size // world
        start = b * self.batch_size + rank * per_rank
        batch = PromptBatch(r for r in (self._source.at(p) for p in range(start, start + per_rank))
                            if self._fits(r))
        batch.index = b
        return batch

    def refill_prompts(self, n: int) -> list[dict]:
        """``n`` more train prompts for dynamic sampling, from a stream separate from the batches'."""
        if self._source is None:
            self.setup()
        rank, world = self._rank()
        out = []
        while len(out) < n:
            record = self._source.at(self._refills * world + rank, refill=True)
            self._refills += 1
            if self._fits(record):
                out.append(record)
        return out

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called right before each training step, after any prefetching: the batch is now really consumed.
        if isinstance(batch, PromptBatch) and batch.index >= 0:
            self._next_batch = batch.index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        # refills are counted per rank and Lightning saves rank 0's datamodule state alone: every rank's count goes in
        # (a collective: Lightning builds the checkpoint dict on every rank)
        return {"next_batch": self._next_batch, "refills": self._refills, "refills_per_rank": self._refills_per_rank(),
                "seed": self.seed, "batch_size": self.batch_size}

    def _refills_per_rank(self) -> list[int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return [self._refills]
        import torch

        return [int(n) for n in trainer.strategy.all_gather(torch.tensor(self._refills)).reshape(-1).tolist()]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed or state_dict.get("batch_size", self.batch_size) != self.batch_size:
            log.warning("Resuming with a different data seed or batch size: the prompt stream will not continue "
                        "where the checkpoint left it.")
        self._next_batch = int(state_dict["next_batch"])
        refills = state_dict.get("refills_per_rank", state_dict.get("refills", 0))   # older checkpoints: one int
        if isinstance(refills, list):
            rank, world = self._rank()
            if len(refills) != world:
                log.warning("The checkpoint's refill positions were saved by %d rank(s) and are resumed by %d: "
                            "refill prompts will not continue exactly.", len(refills), world)
            refills = refills[rank] if rank < len(refills) else max(refills)
        self._refills = int(refills)

    # -------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        if self._source is None:
            self.setup()
        # one process: the stream's position must be the trainer's, and generating prompts is cheap
        return DataLoader(_TrainPromptStream(self), batch_size=None, collate_fn=_identity, num_workers=0)

    def _fixed_loader(self, records: list[dict]) -> DataLoader:
        if self._source is None:
            self.setup()
        return DataLoader(_ListDataset(records), batch_size=self.batch_size, shuffle=False,
                          collate_fn=collate_prompts, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader(self.val_records)

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader(self.test_records)

    def iter_train(self) -> Iterator[PromptBatch]:
        """The train stream outside a Trainer; each yielded batch counts as consumed."""
        for batch in self.train_dataloader():
            yield self.on_before_batch_transfer(batch, 0)
