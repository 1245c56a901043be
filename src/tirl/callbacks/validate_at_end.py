"""Validate after the last optimizer step (added to every training run by ``tirl.train.run``, not by config)."""

from __future__ import annotations

import lightning.pytorch as pl


class ValidateAtEndOfFit(pl.Callback):
    """Validate after the last optimizer step whatever ``trainer.val_check_interval`` is, so a run shorter than the
    interval still reports its after-training held-out metrics (and ModelCheckpoint sees them).

    It asks the loop to stop after this step (``trainer.should_stop``), which Lightning answers by validating once
    before it stops; when the last step is a validation step anyway, that is the one validation. The last step is the
    one that reaches ``trainer.max_steps``, or the last batch of the last epoch when ``max_epochs`` ends the run.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loop = trainer.fit_loop
        last_step = trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        last_epoch = (trainer.max_epochs is not None and trainer.max_epochs > 0
                      and trainer.current_epoch + 1 >= trainer.max_epochs and loop.epoch_loop.batch_progress.is_last_batch)
        if last_step or last_epoch:
            trainer.should_stop = True
