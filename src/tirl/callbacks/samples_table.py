"""The rollout samples table: the first k rollouts of each training step and validation batch, with their reward.

W&B gets a table (``train/samples``, ``val/samples``); a logger with a ``log_dir`` (CSV, TensorBoard) gets
``train_samples.csv`` / ``val_samples.csv`` beside its metrics. The ``step`` column is the step number of the
metrics row the same step's (or validation's) metrics are written in (``tirl.logging.step_metrics.log_step``).
The RL module returns ``{"rollouts": (trajectories, rewards, correct)}`` from its training/validation/test step.
"""

from __future__ import annotations

import csv
import os

import lightning.pytorch as pl

from tirl.logging.step_metrics import log_step

COLUMNS = ["step", "id", "response", "reward", "correct", "calls", "failed_calls"]


class SamplesTable(pl.Callback):
    def __init__(self, rows_per_step: int) -> None:
        self.rows_per_step = rows_per_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.write(trainer, pl_module, "train", outputs)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self.write(trainer, pl_module, "val", outputs)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self.write(trainer, pl_module, "val", outputs)

    def write(self, trainer: pl.Trainer, pl_module, split: str, outputs) -> None:
        k = self.rows_per_step
        # rank 0 only, as W&B's log_table and the CSV metrics are: under DDP every rank appending to one CSV raced
        # on its header and doubled the rows
        if not k or not isinstance(outputs, dict) or "rollouts" not in outputs or trainer.sanity_checking \
                or trainer.global_rank != 0:
            return
        trajs, rewards, correct = outputs["rollouts"]
        # the step number of the metrics.csv row this step's (or this validation's) metrics are written in
        step = log_step(trainer)
        rows = [[step, t.meta.get("id"), pl_module.response_text(t), r, c, t.num_calls, t.failed_calls]
                for t, r, c in list(zip(trajs, rewards, correct))[:k]]
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):     # W&B
                logger.log_table(key=f"{split}/samples", columns=COLUMNS, data=rows)
            elif getattr(logger, "log_dir", None):
                path = os.path.join(logger.log_dir, f"{split}_samples.csv")
                new = not os.path.exists(path)
                with open(path, "a", newline="") as f:
                    w = csv.writer(f)
                    if new:
                        w.writerow(COLUMNS)
                    w.writerows(rows)
