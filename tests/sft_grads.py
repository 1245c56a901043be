"""Shared by the SFT normalisation tests (one process with accumulation; two DDP ranks): hand-built samples with very
different loss-token counts, an SFTModule that records what each optimizer step saw and applied, and the one-process
full-batch reference gradient."""

from __future__ import annotations

import os

import torch

from tirl.config.schema import MethodConfig, ModelConfig
from tirl.data.collate import IGNORE, Example
from tirl.data.datamodules import SFTDataModule
from tirl.models.tiny import load_tiny_tokenizer
from tirl.modules.sft import SFTModule
from tirl.rl import core


def examples_with_loss_tokens(counts: list[int], prompt: int = 6) -> list[Example]:
    """One sample per count: ``prompt`` unlabelled tokens, then ``count`` labelled ones (random ids, seeded)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in counts:
        ids = torch.randint(10, 1000, (prompt + n,), generator=g).tolist()
        out.append(Example(ids, [0] * prompt + [1] * n))
    return out


def sft_kwargs(lr: float = 1e-3) -> dict:
    """SFTModule arguments: the random tiny model (seeded), no warmup, a constant LR."""
    return {"method": MethodConfig(lr=lr, warmup_steps=0, lr_schedule="constant"),
            "model": ModelConfig(name_or_path="tiny"), "tokenizer": load_tiny_tokenizer()}


def datamodule(examples: list[Example], batch_size: int) -> SFTDataModule:
    dm = SFTDataModule(load_tiny_tokenizer(), train="unused.jsonl", batch_size=batch_size, val_size=0)
    dm._sets = {"train": list(examples), "val": [], "test": []}   # hand-built samples, no file
    return dm


class RecordingSFT(SFTModule):
    """Saves, per optimizer step and rank: the micro-batches it trained on, the weights before the step and the
    gradient the optimizer is about to apply (after accumulation and DDP's sync)."""

    def __init__(self, out_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.seen: list[dict] = []

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)
        super().setup(stage)

    def training_step(self, batch, batch_idx):
        self.seen.append({k: batch[k].detach().cpu().clone() for k in ("input_ids", "attention_mask", "labels")})
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        record = {"batches": self.seen,
                  "weights": {n: p.detach().clone() for n, p in self.policy.named_parameters()},
                  "grads": {n: p.grad.detach().clone() for n, p in self.policy.named_parameters() if p.grad is not None}}
        torch.save(record, os.path.join(self.out_dir, f"step{self.global_step}_rank{self.global_rank}.pt"))
        self.seen = []


def full_batch_gradient(module: SFTModule, weights: dict, batches: list[dict], per_micro_batch: bool = False) -> dict:
    """Gradient of the token mean of the NLL over every loss token of ``batches`` (one optimizer step), at ``weights``.
    ``per_micro_batch``: instead the mean of each micro-batch's own token mean (the normalisation being fixed)."""
    module.policy.load_state_dict(weights, strict=False)   # parameters only (tied weights appear once)
    module.policy.zero_grad(set_to_none=True)
    total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    for b in batches:
        logits = module.policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        mask = (labels != IGNORE).float()
        nll = -core.token_logprobs(logits, labels.clamp(min=0))
        loss = core.masked_sum(nll, mask) / (mask.sum().clamp(min=1) * len(batches) if per_micro_batch else total)
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None}


def relative_error(got: dict, want: dict) -> float:
    """|got - want| / |want| over all parameters together."""
    names = sorted(want)
    a = torch.cat([got[n].flatten() for n in names])
    b = torch.cat([want[n].flatten() for n in names])
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
