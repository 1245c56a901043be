"""The SFT DataModule: tokenised (optionally packed) chat samples with their loss-token counts; a resumable train
stream. Validation and test sets as ``tirl.data.datamodules`` describes."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from tirl.data.collate import (
    Example,
    SFTCollator,
    loss_token_count,
    pack_examples,
    pad_examples,
)
from tirl.data.prompts import PromptEncoder
from tirl.data.sources import DataError, load_records
from tirl.data.splits import (
    DATA_CONFIG_FIELDS,
    _generator_options,
    _ListDataset,
    _reject_unknown,
    _split_off,
    _synthetic_name,
    _train_split,
    _trainer_layout,
)

log = logging.getLogger(__name__)


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
