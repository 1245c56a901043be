"""Run a task so that its loggers are closed whatever happens.

A W&B run left open when a job raises keeps its background process alive, which hangs a Hydra multirun;
a CSV logger that is never finalized loses its buffered metrics. ``task_wrapper`` finalizes every logger the
task registered (``register_loggers``), finishes any active W&B run, logs the output directory, and
re-raises the task's exception so the sweep records the failure and moves on.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from tirl.errors import UserError

log = logging.getLogger(__name__)

R = TypeVar("R")

# One list per running task (a stack, so a task wrapped inside another closes only its own loggers).
_open_loggers: list[list[Any]] = []


def register_loggers(loggers: Iterable[Any]) -> None:
    """Hand loggers to the innermost running ``task_wrapper`` so they are closed when the task ends."""
    if _open_loggers:
        _open_loggers[-1].extend(loggers)


def close_loggers(loggers: Iterable[Any], status: str) -> None:
    """Finalize each logger (``"success"`` or ``"failed"``); one failing close does not stop the others."""
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception as err:  # closing is best effort; the task's own error matters more
            log.warning("Closing logger %s failed: %s", type(logger).__name__, err)


def finish_wandb(status: str) -> None:
    """Finish the active W&B run, if wandb was imported and a run is open (never imports wandb itself)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        log.info("Closing W&B run.")
        wandb.finish(exit_code=0 if status == "success" else 1)


def _output_dir(cfg: DictConfig) -> str | None:
    try:
        return OmegaConf.select(cfg, "paths.output_dir", default=None)
    except Exception:  # outside a Hydra run the ${hydra:...} resolver has nothing to read
        return None


def _to_log_files(message: str) -> None:
    """Write an error record to the file handlers only (the console gets the user's sentence once, on stderr)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def task_wrapper(task: Callable[[DictConfig], R]) -> Callable[[DictConfig], R]:
    """Decorate ``task(cfg)``: close loggers and W&B on success and failure, log the output dir, re-raise."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> R:
        opened: list[Any] = []
        _open_loggers.append(opened)
        status = "failed"
        try:
            result = task(cfg)
            status = "success"
            return result
        except UserError as err:  # the entry point prints its sentence; the job's log file keeps it too
            _to_log_files(f"Task {task.__name__} stopped: {err}")
            raise
        except Exception:
            log.exception("Task %s failed.", task.__name__)  # into the job's log file, before re-raising
            raise
        finally:
            _open_loggers.pop()  # ours: a nested task has already popped its own
            close_loggers(opened, status)
            finish_wandb(status)
            out = _output_dir(cfg)
            if out:
                log.info("Output dir: %s", out)

    return wrapped
