"""Evaluation run: validate → tokenizer → datamodule → module (weights from init_from/ckpt_path) → trainer.test.

The method's module owns the test step (rollouts with the configured backend, self-correction if enabled,
benchmark metrics); this file only wires config to objects, like ``tirl.train``.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tirl.config import (
    CONFIG_DIR,
    ConfigError,
    check_trainer_keys,
    exit_on_bad_overrides,
    exit_on_config_error,
    register_loggers,
    task_wrapper,
    validate,
)
from tirl.train import build_datamodule, build_module, check_accelerator, instantiate_group

log = logging.getLogger(__name__)


@task_wrapper
def run(cfg: DictConfig) -> dict[str, float]:
    """Test the configured model on data.test; return every logged test metric as a float."""
    typed = validate(cfg)
    if typed.data.test is None:
        raise ConfigError("Evaluation needs test data; set data.test (e.g. data=bfcl or data.test=path/to/test.jsonl).")
    check_trainer_keys(cfg.trainer)
    check_accelerator(cfg.trainer)

    import lightning.pytorch as pl

    from tirl.models.load import load_tokenizer

    pl.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(typed.model.name_or_path, trust_remote_code=typed.model.trust_remote_code)
    datamodule = build_datamodule(typed, tokenizer)
    module = build_module(typed, tokenizer, cfg.get("init_from"))

    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    register_loggers(loggers)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.test(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    for name, value in sorted(metrics.items()):
        log.info("%s = %.4f", name, value)
    return metrics


def _hydra_task(cfg: DictConfig) -> Any:
    with exit_on_config_error():
        return run(cfg)


def main() -> None:
    """Console script ``tirl-eval``: the same as ``python src/eval.py`` (needs a source checkout's configs/)."""
    if not (CONFIG_DIR / "eval.yaml").is_file():
        raise SystemExit(
            f"tirl-eval needs the configs/ directory of a source checkout (looked in {CONFIG_DIR}); "
            "install with `pip install -e .` from the repository or run `python src/eval.py`."
        )
    exit_on_bad_overrides()
    hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")(_hydra_task)()
