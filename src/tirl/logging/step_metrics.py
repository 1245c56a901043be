"""Which step a logged training metric belongs to.

Lightning keeps every key a ``training_step`` ever logged and, at each step it writes to the loggers, writes the
last value of every key again, whether or not this step logged it. A metric logged on some steps only (an update's
loss and grad norm when another step skipped its update, a filter reason seen now and then) then shows a stale
value at steps where it does not exist. ``forget_step_metrics`` is called before each training step, so a step's
row holds exactly what that step logged.

``log_step`` is the step number Lightning writes with each metrics row (optimizer steps completed before this
one), for files tirl writes beside the loggers (``train_samples.csv``), so every file agrees on step numbers.
"""

from __future__ import annotations


def forget_step_metrics(trainer) -> None:
    """Mark the step-only metrics that ``training_step`` logged so far as not logged (Lightning's result
    collection skips such entries until they are logged again); epoch-level aggregates are left alone."""
    results = getattr(trainer, "_results", None) if trainer is not None else None
    if results is None:
        return
    for metric in results.result_metrics:
        meta = metric.meta
        if meta.fx == "training_step" and meta.on_step and not meta.on_epoch:
            metric.has_reset = True


def log_step(trainer) -> int:
    """The ``step`` Lightning gives the metrics row written for the current training step (and for a validation
    run inside fit, the step it follows; before fit, 0)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
