"""Training run: validate → seed → tokenizer → datamodule → module → callbacks, loggers, trainer → fit → test.

``run(cfg)`` returns the metric named by ``optimized_metric`` so Hydra sweepers (Optuna) can optimise it.
Heavy imports (torch, lightning, transformers) happen inside ``run`` so that composing or printing a config
(``python src/train.py --cfg job``) loads no model and touches no network.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from tirl.config import (
    CONFIG_DIR,
    ConfigError,
    TypedConfig,
    check_trainer_keys,
    exit_on_bad_overrides,
    hydra_entry,
    register_loggers,
    task_wrapper,
    validate,
)
from tirl.config.preflight import lightning_step_counts, preflight_train
from tirl.config.provenance import exit_on_provenance_flag, record_provenance
from tirl.logging.quiet import quiet_library_notices

log = logging.getLogger(__name__)


def instantiate_group(group_cfg: Mapping | None, what: str) -> list[Any]:
    """Instantiate every ``{name: {_target_: ...}}`` entry of the callbacks or logger group."""
    objects: list[Any] = []
    for name, entry in (group_cfg or {}).items():
        if entry is None:  # `~logger.wandb` style removal leaves a null
            continue
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ConfigError(f"{what}.{name} needs a _target_ naming the class to build; see configs/{what}/.")
        log.info("Instantiating %s <%s>", what, entry["_target_"])
        objects.append(instantiate(entry))
    return objects


def check_accelerator(trainer_cfg: Mapping) -> None:
    """A GPU config on a machine without CUDA fails here in one sentence, not deep inside Lightning."""
    import torch

    if str(trainer_cfg.get("accelerator", "auto")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "The config asks for a GPU (trainer.accelerator=gpu) but CUDA is not available here; "
            "use hardware=cpu or run on a machine with a GPU."
        )


def check_multinode_launch(trainer) -> None:
    """``trainer.num_nodes`` > 1 needs one process per node started by a launcher (srun, torchrun --nnodes, or
    NODE_RANK/MASTER_ADDR set by hand on each node); started bare on one machine the ranks wait for nodes that never
    come. Raises ConfigError then, before any rank starts."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_nodes > 1 and type(env).__name__ == "LightningEnvironment" and "NODE_RANK" not in os.environ:
        raise ConfigError(f"trainer.num_nodes={trainer.num_nodes} but this process was not started by a multi-node "
                          f"launcher, so its ranks would wait for the other nodes forever; launch with srun or torchrun "
                          f"--nnodes (README: hardware=multinode), or set trainer.num_nodes=1 on one machine.")


def quiet_other_ranks() -> None:
    """Progress lines (data, model, before/after training) once: from rank 0. Lightning starts ranks 1.. with LOCAL_RANK
    or NODE_RANK set; their tirl logs keep warnings and errors only."""
    if int(os.environ.get("LOCAL_RANK", 0) or 0) > 0 or int(os.environ.get("NODE_RANK", 0) or 0) > 0:
        logging.getLogger("tirl").setLevel(logging.WARNING)


def build_datamodule(typed: TypedConfig, tokenizer: Any) -> Any:
    """The datamodule named by data._target_, given every DataConfig field (schema defaults included) and
    how the model's prompts are made (thinking switch, tool rendering) and, for SFT, the loss turns."""
    kwargs = dataclasses.asdict(typed.data)
    cls = get_class(kwargs.pop("_target_"))
    kwargs.pop("task")   # picks the reward (tirl.config.tasks), not a datamodule argument
    kwargs["synthetic"] = {k: v for k, v in kwargs["synthetic"].items() if v is not None}
    kwargs["enable_thinking"] = typed.model.enable_thinking
    kwargs["tool_prompt"] = typed.model.tool_prompt
    if typed.method.kind == "sft":
        kwargs["loss_on"] = typed.method.loss_on
    return cls(**kwargs, tokenizer=tokenizer)


def build_module(typed: TypedConfig, tokenizer: Any, init_from: str | None) -> Any:
    """The LightningModule named by method.module._target_, given the typed groups it orchestrates."""
    module_cfg = dict(typed.method.module)
    target = module_cfg.pop("_target_", None)
    if not target:
        raise ConfigError("method.module needs a _target_ naming the LightningModule, e.g. tirl.modules.grpo.GRPOModule.")
    return get_class(target)(
        **module_cfg,
        method=typed.method,
        model=typed.model,
        rollout=typed.rollout,
        sandbox=typed.sandbox,
        tokenizer=tokenizer,
        init_from=init_from,
    )


def metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """The optimised metric as a float (None when no metric is configured, or when it is a ``val/`` metric and no
    validation ran at all: a train file too small to hold prompts out, or ``limit_val_batches=0``). Raises
    ConfigError when validation ran but never logged ``name`` (a typo in ``optimized_metric``)."""
    if not name:
        return None
    if name not in metrics and name.startswith("val/") and not any(str(k).startswith("val/") for k in metrics):
        log.warning("No validation ran, so optimized_metric '%s' has no value; give data.val=<file> for one.", name)
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics)) or "none"
        raise ConfigError(f"optimized_metric '{name}' was never logged; set it to one of the logged metrics: {logged}.")
    return float(metrics[name])


def check_run_can_start(cfg: DictConfig, typed) -> None:
    """The start checks of a training run: ``tirl.config.preflight.preflight_train`` and, for RL, the rollout
    backend (``tirl.rollout.backend.check_backend_available``); a ``UserError`` names what to change."""
    preflight_train(cfg, typed, CONFIG_DIR)
    if typed.method.kind == "rl":
        from tirl.rollout.backend import check_backend_available

        check_backend_available(typed.rollout)


@task_wrapper
def run(cfg: DictConfig) -> float | None:
    """Train (and test) as configured; return the value of ``cfg.optimized_metric``."""
    quiet_library_notices()
    quiet_other_ranks()
    typed = validate(cfg)
    check_run_can_start(cfg, typed)   # method vs data, paths, rollout backend: before any model loads
    record_provenance(cfg, OmegaConf.select(cfg, "paths.output_dir"))   # which file set which value, logged and saved
    check_trainer_keys(cfg.trainer)
    check_accelerator(cfg.trainer)
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu" and typed.model.fsdp.cpu_offload:
        raise ConfigError("model.fsdp.cpu_offload=true moves shards off the GPUs to the CPU, but these ranks already "
                          "run on the CPU (trainer.accelerator=cpu); set model.fsdp.cpu_offload=false.")

    import lightning.pytorch as pl

    from tirl.models.load import load_tokenizer

    pl.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(typed.model.name_or_path, trust_remote_code=typed.model.trust_remote_code)
    log.info("Instantiating datamodule <%s>", typed.data._target_)
    datamodule = build_datamodule(typed, tokenizer)
    log.info("Instantiating module <%s>", typed.method.module.get("_target_"))
    module = build_module(typed, tokenizer, cfg.get("init_from"))

    from tirl.callbacks import ValidateAtEndOfFit

    callbacks = [*instantiate_group(cfg.get("callbacks"), "callbacks"), ValidateAtEndOfFit()]
    loggers = instantiate_group(cfg.get("logger"), "logger")
    register_loggers(loggers)  # closed by task_wrapper even if fit raises
    # issue 18: val_check_interval is in optimizer steps; Lightning counts rounds (training_step calls)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          **lightning_step_counts(cfg, typed))
    check_multinode_launch(trainer)
    if typed.method.kind == "rl":   # known now, before any rank starts or any model loads: said once, not per rank
        from tirl.rl.schedule import check_world_size

        check_world_size(typed.method.rollout_batch_size, typed.method.mini_batch_size, trainer.world_size)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics: dict[str, Any] = {}
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("train", True):
        if cfg.get("validate_before_fit", False) and not ckpt_path:
            before = trainer.validate(module, datamodule=datamodule, verbose=False)
            before = before[0] if before else {}
            log.info("Before training: %s", {k: round(float(v), 4) for k, v in before.items()})
            metrics.update(before)   # the optimised metric still exists if fit ends before its first validation
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        after = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        log.info("After training: %s", after or "no validation ran (no held-out set; give data.val=<file> for one)")
        metrics.update(trainer.callback_metrics)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        ckpt_path = best or None  # test the best checkpoint; without one, the weights as they are
    if cfg.get("test", True):
        if typed.data.test is None:
            log.info("No test stage: data.test is null (test=false silences this).")
        else:
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path)
            metrics.update(trainer.callback_metrics)
    return metric_value(metrics, cfg.get("optimized_metric"))


def main() -> None:
    """``python src/train.py`` and the console script ``tirl-train``: check the command line (an unknown option or key
    is one sentence; ``--provenance`` prints which file set each value and exits), then train."""
    def precheck() -> None:
        exit_on_bad_overrides("train")
        exit_on_provenance_flag("train")

    hydra_entry("train", run, precheck)
