"""Supervised fine-tuning of the policy (full or LoRA) on chat samples with loss masks.

Batches come from ``tirl.data.datamodules.SFTDataModule``: ``input_ids``, ``attention_mask``, ``labels`` (-100
where no loss: prompts, tool output, padding) and optional ``position_ids`` for packed rows. The loss is a
token mean over the labelled tokens of the batch.
"""

from __future__ import annotations

import time

import torch

from tirl.config.schema import MethodConfig, ModelConfig
from tirl.modules.policy import PolicyModule
from tirl.rl import core


class SFTModule(PolicyModule):
    def __init__(self, method: MethodConfig, model: ModelConfig, tokenizer, init_from: str | None = None,
                 rollout=None, sandbox=None):
        # rollout/sandbox are accepted so every method preset is instantiated the same way; SFT needs neither
        super().__init__(method, model, tokenizer, init_from)
        self._t0 = None

    def loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "position_ids" in batch:
            # packed rows: restarting positions alone keep attention inside each sample, but only with no
            # attention mask (an all-ones mask re-enables plain causal attention across samples) and no cache
            kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        logits = self.policy(**kwargs).logits[:, :-1]                          # [B, L-1, V]
        labels = batch["labels"][:, 1:]                                          # [B, L-1]
        mask = (labels != -100).float()
        logp = core.token_logprobs(logits, labels.clamp(min=0))
        n = int(mask.sum().item())
        return core.aggregate(-logp, mask, "token-mean"), n

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        loss, n = self.loss(batch)
        elapsed = time.perf_counter() - self._t0
        self._t0 = time.perf_counter()
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/tokens_per_s", batch["attention_mask"].sum().item() / max(elapsed, 1e-6), batch_size=bs)
        self.log("train/loss_tokens", float(n), batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, _ = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, _ = self.loss(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        self.policy.train()
