"""Lightning DataModules: tokenised SFT batches, and endless seeded streams of RL prompts.

Both take the DataConfig fields (``tirl.config.schema.DataConfig``) as constructor arguments, plus the
tokenizer and the few fields that belong to the model or method (``enable_thinking``, ``tool_prompt``, ``loss_on``);
an unknown
argument is an error naming the closest valid one.

Validation / test sets: ``val`` / ``test`` sources when given; otherwise, for a synthetic train source, the
first ``val_size`` (val) and next ``val_size`` (test) distinct held-out problems (a hash split that never
overlaps the train stream); for a file train source, ``val_size`` records held out from a seeded shuffle, at most a
fifth of the file (``heldout_count``).
"""

from __future__ import annotations

import difflib
import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tirl.data.collate import (
    Example,
    SFTCollator,
    collate_prompts,
    loss_token_count,
    pack_examples,
    pad_examples,
)
from tirl.data.prompts import PromptEncoder
from tirl.data.sources import DataError, RecordStream, load_records
from tirl.data.synthetic_math import math_rl_prompt, problem_at
from tirl.data.synthetic_toolcall import task_at, toolcall_rl_prompt

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


class _SFTTrainStream(IterableDataset):
    """One epoch of this rank's SFT micro-batches, grouped by optimizer step.

    Epoch e visits the train items in a permutation seeded by (seed, e), the same on every rank. An optimizer step
    (an accumulation window) takes the next ``batch_size x accumulate_grad_batches x world_size`` items: on each rank
    ``accumulate_grad_batches`` micro-batches of ``batch_size``. Every micro-batch carries the loss-token count of its
    whole window over all ranks (``window_loss_tokens``), so the module can divide each step's summed token losses by
    that global count, as the RL update does: the step's gradient is then the same however it is split into
    micro-batches and ranks. The epoch's last window may be short: its items are spread evenly over
    ceil(n / (batch_size x world_size)) micro-batches per rank, and a micro-batch left with no item is one padding
    token without loss, so every rank runs as many backward passes (DDP syncs gradients in each).
    Iterated in the main process (``num_workers`` applies to val/test): collating pre-tokenised items is cheap.
    """

    def __init__(self, dm: SFTDataModule) -> None:
        self.dm = dm
        self.counts = [loss_token_count(item) for item in dm._sets["train"]]

    def plan(self, epoch: int) -> list[tuple[list[int], int, bool]]:
        """This rank's micro-batches of ``epoch``: (item indices, loss tokens of the window, last of its window)."""
        k, rank, world, _ = _trainer_layout(self.dm)
        order = list(range(len(self.counts)))
        random.Random(f"tirl-sft-epoch:{self.dm.seed}:{epoch}").shuffle(order)
        step = self.dm.batch_size * k * world
        out = []
        for start in range(0, len(order), step):
            window = order[start:start + step]
            micro = min(k, -(-len(window) // (self.dm.batch_size * world)))      # micro-batches per rank
            chunks = micro * world
            size, extra = divmod(len(window), chunks)
            bounds = [0]
            for c in range(chunks):
                bounds.append(bounds[-1] + size + (c < extra))
            tokens = sum(self.counts[i] for i in window)
            for m in range(micro):
                c = m * world + rank
                out.append((window[bounds[c]:bounds[c + 1]], tokens, m == micro - 1))
        return out

    def __len__(self) -> int:
        return len(self.plan(0))

    def __iter__(self) -> Iterator[dict]:
        epoch = _trainer_layout(self.dm)[3]
        skip = self.dm._resume_position.get(epoch, 0)
        items = self.dm._sets["train"]
        for index, (idx, tokens, last) in enumerate(self.plan(epoch)):
            if index < skip:
                continue
            if idx:
                batch = self.dm.collator([items[i] for i in idx])
            else:
                batch = pad_examples([Example([self.dm.tokenizer.pad_token_id], [0])], self.dm.tokenizer.pad_token_id)
            batch["window_loss_tokens"] = torch.tensor(float(tokens))
            batch["window_last"] = torch.tensor(last)
            batch["stream_position"] = torch.tensor([epoch, index])
            yield batch


class SFTDataModule(LightningDataModule):
    """Chat samples -> ``{"input_ids", "attention_mask", "labels"}`` [B, T] (+ ``position_ids`` when packing).

    Train batches are micro-batches grouped by optimizer step (``_SFTTrainStream``) and also carry
    ``window_loss_tokens`` (scalar: loss tokens of the step over all its micro-batches and ranks), ``window_last``
    (bool: the step's last micro-batch) and ``stream_position`` ([epoch, index], for exact resume).
    A sample's own ``loss_on`` wins over the module's default. Samples longer than ``max_length`` are
    truncated (counted in ``self.truncated``). Bad records are errors or skipped (``self.skipped``).
    """

    def __init__(self, tokenizer=None, train: Any = None, val: Any = None, test: Any = None, batch_size: int = 4,
                 num_workers: int = 0, max_length: int = 512, seed: int = 0, on_bad_line: str = "error",
                 synthetic: dict | None = None, streaming: bool = False, packing: bool = False, val_size: int = 64,
                 loss_on: str = "assistant", enable_thinking: bool = True, tool_prompt: str = "system",
                 sandbox: Any = None, **unknown) -> None:
        super().__init__()
        _reject_unknown("SFTDataModule", unknown,
                        DATA_CONFIG_FIELDS + ("tokenizer", "loss_on", "enable_thinking", "tool_prompt", "sandbox"))
        if tokenizer is None or train is None:
            raise DataError("SFTDataModule needs a tokenizer and data.train (a file, directory, hf: id or synthetic:).")
        if loss_on not in ("assistant", "last_assistant"):
            raise DataError(f"loss_on must be 'assistant' or 'last_assistant', got {loss_on!r}.")
        self.tokenizer, self.prompts = tokenizer, PromptEncoder(tokenizer, enable_thinking, tool_prompt)
        self.train_spec, self.val_spec, self.test_spec = train, val, test
        self.batch_size, self.num_workers, self.max_length, self.seed = batch_size, num_workers, max_length, seed
        self.on_bad_line, self.synthetic, self.streaming = on_bad_line, dict(synthetic or {}), streaming
        self.packing, self.val_size, self.loss_on, self.sandbox = packing, val_size, loss_on, sandbox
        self.collator = SFTCollator(tokenizer.pad_token_id, packing, max_length)
        self.skipped = 0
        self.truncated = 0
        self._sets: dict[str, list] | None = None
        self._resume_position: dict[int, int] = {}   # epoch -> first micro-batch not yet trained on

    # -------------------------------------------------------------- records -> examples
    def _records(self, spec: Any, split: str) -> list[dict]:
        """Records of ``spec``; for a synthetic spec, ``split`` picks train samples or held-out val/test ones."""
        name = _synthetic_name(spec)
        if name is None:
            stream = load_records(spec, self.on_bad_line, self.streaming, kind="sft")
            records = list(stream)
            self.skipped += stream.skipped
            if stream.skipped:
                log.warning("Skipped %d bad records in %s.", stream.skipped, spec)
            return records
        # held-out sets: the first val_size distinct held-out samples are val, the next val_size are test
        size = self.synthetic.get("size")
        size = (1000 if size is None else int(size)) if split == "train" else 2 * self.val_size   # None: the default
        gen_split = _train_split(self.synthetic) if split == "train" else "heldout"
        options = {**_generator_options(self.synthetic, name), "format": "sft", "size": size, "split": gen_split}
        if name == "math" and self.sandbox is None:
            from tirl.tools.sandbox import LocalSandbox

            with LocalSandbox(workers=1) as sandbox:  # the solutions' outputs come from really running them
                records = list(load_records(spec, kind="sft", seed=self.seed, synthetic=options, sandbox=sandbox))
        else:
            records = list(load_records(spec, kind="sft", seed=self.seed, synthetic=options, sandbox=self.sandbox))
        return {"train": records, "val": records[: self.val_size], "test": records[self.val_size :]}[split]

    def encode(self, record: dict) -> list[Example]:
        """A record's training sequences (one, or one per turn when the chat template rewrites history)."""
        examples = []
        for seq in self.prompts.conversation(record, record.get("loss_on", self.loss_on)):
            example = Example(seq.input_ids, seq.loss_mask)
            if len(example) > self.max_length:
                self.truncated += 1
                example = example.truncated(self.max_length)
            examples.append(example)
        return examples

    def _examples(self, records: list[dict]) -> list:
        examples = [e for r in records for e in self.encode(r)]
        return list(pack_examples(examples, self.max_length)) if self.packing else examples

    def setup(self, stage: str | None = None) -> None:
        if self._sets is not None:
            return
        train = self._records(self.train_spec, "train")
        synthetic_train = _synthetic_name(self.train_spec) is not None
        if self.val_spec is not None:
            val = self._records(self.val_spec, "val")
        elif synthetic_train:
            val = self._records(self.train_spec, "val")
        elif self.val_size > 0:
            train, val = _split_off(train, self.val_size, self.seed)
        else:
            val = []
        if self.test_spec is not None:
            test = self._records(self.test_spec, "test")
        else:
            test = self._records(self.train_spec, "test") if synthetic_train else []
        self._sets = {"train": self._examples(train), "val": self._examples(val), "test": self._examples(test)}
        if self.truncated:
            log.warning("Truncated %d samples longer than max_length=%d.", self.truncated, self.max_length)

    def _loader(self, split: str) -> DataLoader:
        if self._sets is None:
            self.setup()
        return DataLoader(_ListDataset(self._sets[split]), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collator, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self._sets is None:
            self.setup()
        return DataLoader(_SFTTrainStream(self), batch_size=None, num_workers=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # right before each training step, after any prefetching: the micro-batch is now really consumed
        if isinstance(batch, dict) and "stream_position" in batch:
            epoch, index = (int(x) for x in batch["stream_position"])
            self._resume_position = {epoch: index + 1}
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"resume_position": dict(self._resume_position), "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = {int(e): int(i) for e, i in state_dict.get("resume_position", {}).items()}

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


# ====================================================================== RL prompts


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
        return {"next_batch": self._next_batch, "refills": self._refills, "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed or state_dict.get("batch_size", self.batch_size) != self.batch_size:
            log.warning("Resuming with a different data seed or batch size: the prompt stream will not continue "
                        "where the checkpoint left it.")
        self._next_batch = int(state_dict["next_batch"])
        self._refills = int(state_dict.get("refills", 0))

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

