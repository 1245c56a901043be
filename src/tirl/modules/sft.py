"""Supervised fine-tuning of the policy (full or LoRA) on chat samples with loss masks.

Batches come from ``tirl.data.datamodules.SFTDataModule``: ``input_ids``, ``attention_mask``, ``labels`` (-100
where no loss: prompts, tool output, padding) and optional ``position_ids`` for packed rows; train micro-batches also
carry ``window_loss_tokens``, the loss-token count of their whole optimizer step (all micro-batches, all ranks).

The loss of an optimizer step is the token mean over every loss token of that step: each micro-batch contributes its
summed token losses divided by the step's global count (``rl.core.aggregate`` with ``num_tokens``, as the RL update
does), so ``trainer.accumulate_grad_batches`` and the number of DDP ranks change nothing but memory and speed. The
value returned to Lightning is scaled by ``accumulate_grad_batches x world_size``, undoing Lightning's division of
an accumulated loss by the former and DDP's averaging of gradients over the latter. ``val/loss`` and ``test/loss``
are token means over the whole set, whatever the batch size.
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
        self._window = {"loss_sum": 0.0, "tokens": 0.0}
        self._eval = {"loss_sum": 0.0, "tokens": 0.0}

    def token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL [B, L-1] of the next-token predictions and their loss mask [B, L-1] (1 = labelled)."""
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "position_ids" in batch:
            # packed rows: restarting positions alone keep attention inside each sample, but only with no
            # attention mask (an all-ones mask re-enables plain causal attention across samples) and no cache
            kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        logits = self.policy(**kwargs).logits[:, :-1]                          # [B, L-1, V]
        labels = batch["labels"][:, 1:]                                          # [B, L-1]
        mask = (labels != -100).float()
        return -core.token_logprobs(logits, labels.clamp(min=0)), mask

    def _global_sum(self, *values: float) -> list[float]:
        """Sums over all ranks (each value as it is in one process)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            t = self.all_gather(t).sum(0)
        return t.tolist()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        nll, mask = self.token_losses(batch)
        k, world = int(self.trainer.accumulate_grad_batches), int(self.trainer.world_size)
        window_tokens = batch.get("window_loss_tokens")
        if window_tokens is None:
            if k > 1 or world > 1:
                raise ValueError("SFT with gradient accumulation or several ranks needs batches from "
                                 "tirl.data.datamodules.SFTDataModule (they carry each step's loss-token count); "
                                 "use data._target_=tirl.data.datamodules.SFTDataModule.")
            window_tokens, last = mask.sum(), True
        else:
            last = bool(batch["window_last"])
        loss = core.aggregate(nll, mask, "token-mean", num_tokens=window_tokens)
        self._window["loss_sum"] += core.masked_sum(nll.detach(), mask).item()
        self._window["tokens"] += float(batch["attention_mask"].sum().item())
        if last:   # the optimizer steps after this micro-batch: log the step's loss over all its tokens
            loss_sum, seen = self._global_sum(self._window["loss_sum"], self._window["tokens"])
            elapsed = time.perf_counter() - self._t0
            self._t0 = time.perf_counter()
            n = float(window_tokens)
            self.log("train/loss", loss_sum / max(n, 1.0), prog_bar=True, batch_size=batch["input_ids"].shape[0])
            self.log("train/loss_tokens", n, batch_size=1)
            self.log("train/tokens_per_s", seen / max(elapsed, 1e-6), batch_size=1)
            self._window = {"loss_sum": 0.0, "tokens": 0.0}
        return loss * (k * world)

    def _eval_step(self, batch: dict) -> None:
        nll, mask = self.token_losses(batch)
        self._eval["loss_sum"] += core.masked_sum(nll, mask).item()
        self._eval["tokens"] += mask.sum().item()

    def _eval_epoch_end(self, prefix: str) -> None:
        loss_sum, tokens = self._global_sum(self._eval["loss_sum"], self._eval["tokens"])
        self._eval = {"loss_sum": 0.0, "tokens": 0.0}
        if tokens > 0:
            self.log(f"{prefix}/loss", loss_sum / tokens, prog_bar=prefix == "val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        self.policy.train()
