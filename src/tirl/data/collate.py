"""Token ids + loss masks -> padded or packed tensor batches for SFT.

Labels are the input ids where the loss mask is 1 and -100 elsewhere (prompt, tool output, padding); the
model shifts them itself. Padding is on the right.

Packing concatenates samples into rows of exactly ``max_length`` tokens. ``position_ids`` restart at 0 for
each sample and the first label of each sample is -100, so no sample is trained to follow the previous one.
For attention to stay inside a sample, call the HF model with ``position_ids``, ``attention_mask=None`` and
``use_cache=False``: transformers then builds a block-diagonal causal mask from the position restarts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Example:
    """One tokenised sample."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 = train on this token

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self) -> list[int]:
        return [t if m else IGNORE for t, m in zip(self.input_ids, self.loss_mask, strict=True)]

    def truncated(self, max_length: int) -> Example:
        return Example(self.input_ids[:max_length], self.loss_mask[:max_length])


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]  # lengths of the samples in the row, in order


def loss_token_count(item: Example | PackedRow) -> int:
    """Tokens that receive loss once the model shifts the labels: labelled positions after the first one."""
    labels = item.labels() if isinstance(item, Example) else item.labels
    return sum(1 for t in labels[1:] if t != IGNORE)


def pad_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each [B, T]."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)       # [B, T]
    attn = torch.zeros((len(examples), width), dtype=torch.long)             # [B, T]
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)    # [B, T]
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels())
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def pack_examples(examples: Iterable[Example], max_length: int) -> Iterator[PackedRow]:
    """Greedy, order-preserving packing: fill a row until the next sample does not fit, then start another.

    Samples longer than ``max_length`` must be truncated beforehand.
    """
    row = PackedRow([], [], [], [])
    for e in examples:
        if len(e) > max_length:
            raise ValueError(f"A {len(e)}-token sample does not fit max_length={max_length}; truncate it first.")
        if len(row.input_ids) + len(e) > max_length:
            yield row
            row = PackedRow([], [], [], [])
        labels = e.labels()
        labels[0] = IGNORE  # the boundary: never predict a sample's first token from the previous sample
        row.input_ids += e.input_ids
        row.labels += labels
        row.position_ids += list(range(len(e)))
        row.seq_lens.append(len(e))
    if row.input_ids:
        yield row


def collate_packed(rows: list[PackedRow], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Packed rows -> input_ids, attention_mask, labels, position_ids, each [B, max_length].

    The unfilled tail of a row is padding: attention_mask 0, labels -100, positions continuing from the last
    sample (so the tail never looks like the start of a new sample).
    """
    batch = {
        "input_ids": torch.full((len(rows), max_length), pad_id, dtype=torch.long),     # [B, T]
        "attention_mask": torch.zeros((len(rows), max_length), dtype=torch.long),      # [B, T]
        "labels": torch.full((len(rows), max_length), IGNORE, dtype=torch.long),       # [B, T]
        "position_ids": torch.zeros((len(rows), max_length), dtype=torch.long),        # [B, T]
    }
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        batch["input_ids"][i, :n] = torch.tensor(r.input_ids)
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(r.labels)
        last = r.position_ids[-1] if n else -1
        batch["position_ids"][i] = torch.tensor(r.position_ids + list(range(last + 1, last + 1 + max_length - n)))
    return batch


class SFTCollator:
    """DataLoader collate_fn: a list of Examples (or PackedRows when packing) -> a tensor batch."""

    def __init__(self, pad_id: int, packing: bool = False, max_length: int | None = None) -> None:
        if packing and max_length is None:
            raise ValueError("Packing needs max_length (the fixed row length).")
        self.pad_id, self.packing, self.max_length = pad_id, packing, max_length

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        if self.packing:
            return collate_packed(items, self.pad_id, self.max_length)
        return pad_examples(items, self.pad_id)


def collate_prompts(items: list[dict]) -> list[dict]:
    """RL batches stay lists of prompt records: the RL module renders and rolls them out."""
    return list(items)
