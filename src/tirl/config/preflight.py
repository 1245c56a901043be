"""Checks of a run that need more than the schema, made before any model or data is loaded.

``validate`` says whether each key is well-formed; this says whether the run can work: the method and the data
fit together (SFT samples for ``method=sft``, prompts whose task the reward scores for RL), every path the run
reads exists (the rollout backend's check is ``tirl.rollout.backend.check_backend_available``). Each failure is a ``ConfigError`` whose one
sentence names the key to change and the config groups to pick (listed from ``configs/``, so a new group shows up).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tirl.config.schema import EpisodeFilterConfig
from tirl.config.tasks import REWARD_TASKS, is_local_path, source_task
from tirl.config.validate import ConfigError, TypedConfig
from tirl.models.sharded_checkpoint import (
    NOT_A_CHECKPOINT,
    checkpoint_layout,
    is_checkpoint_path,
    looks_sharded,
    sharded_checkpoint_problem,
)

# What each datamodule feeds: SFT chat samples or RL prompts (a user's own datamodule is not checked).
DATAMODULE_KINDS: dict[str, str] = {
    "tirl.data.datamodules.SFTDataModule": "sft",
    "tirl.data.datamodules.RLPromptDataModule": "rl",
}
# Lightning's own names for a checkpoint to resume (not paths).
LIGHTNING_CKPT_NAMES = frozenset({"last", "best", "hpc", "registry"})


@functools.cache
def _group_yamls(config_dir: Path, group: str) -> dict[str, Any]:
    """Option name → its yaml (as written, not composed) for the options of a config group."""
    root = config_dir / group
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)) or {} for p in sorted(root.glob("*.yaml"))
            if not p.stem.startswith("_")}


def data_groups(config_dir: Path, kind: str) -> list[str]:
    """``data=`` options whose datamodule feeds ``kind`` (sft | rl), file ones first."""
    names = [name for name, node in _group_yamls(config_dir, "data").items()
             if DATAMODULE_KINDS.get(str(node.get("_target_"))) == kind]
    return sorted(names, key=lambda n: ("jsonl" not in n, n))


def method_groups(config_dir: Path, task: str) -> list[str]:
    """RL ``method=`` options that can train on ``task``: for toolcall, those whose episode filter keeps answers
    without ``\\boxed{}`` (each yaml read over the schema defaults; its base preset is not followed)."""
    out = []
    for name, node in _group_yamls(config_dir, "method").items():
        if node.get("kind", "rl") != "rl":
            continue
        episode = {**vars(EpisodeFilterConfig()), **(node.get("episode_filter") or {})}
        if task == "math" or not (episode["enabled"] and episode["drop_no_boxed"]):
            out.append(name)
    return out


def _data_hint(config_dir: Path, kind: str) -> str:
    return ", ".join(f"data={n}" + (" data.train=<file>" if "jsonl" in n else "") for n in data_groups(config_dir, kind))


def _task_data_hint(task: str) -> str:
    picks = "data=synthetic_toolcall, data=bfcl" if task == "toolcall" else "data=synthetic_math"
    return f"{picks} or data=jsonl data.train=<your {task} file>"


def check_method_data(typed: TypedConfig, config_dir: Path) -> None:
    """The method trains on what the data gives: SFT samples for ``method.kind=sft``; for ``rl``, prompts of the
    task the reward scores (where a source's name tells it), and a method whose episode filter keeps them."""
    method, data = typed.method, typed.data
    kind = DATAMODULE_KINDS.get(data._target_)
    if kind is not None and kind != method.kind:
        if method.kind == "sft":
            raise ConfigError(f"method={method.name} trains on chat samples but the data config gives RL prompts "
                              f"({data._target_.rsplit('.', 1)[-1]}); pick SFT data: {_data_hint(config_dir, 'sft')}.")
        raise ConfigError(f"method={method.name} is RL and needs prompts with answers but the data config gives SFT "
                          f"samples; pick RL data: {_data_hint(config_dir, 'rl')}.")
    if method.kind != "rl":
        return
    wanted = REWARD_TASKS.get(str(method.reward.name))
    for split in ("train", "val", "test"):
        spec = getattr(data, split)
        got = source_task(spec)
        if wanted and got and got != wanted:
            methods = ", ".join(f"method={m}" for m in method_groups(config_dir, got))
            raise ConfigError(
                f"method={method.name} scores {wanted} answers (method.reward.name={method.reward.name}, "
                f"data.task={data.task}) but data.{split}={spec} gives {got} prompts; train and evaluate on one "
                f"task: {wanted} data ({_task_data_hint(wanted)}) or {got} data throughout with a {got} method "
                f"({methods})."
            )
    episode = method.episode_filter
    if wanted == "toolcall" and episode.enabled and episode.drop_no_boxed:
        methods = ", ".join(f"method={m}" for m in method_groups(config_dir, "toolcall"))
        raise ConfigError(
            f"method={method.name} drops every answer without \\boxed{{}} (method.episode_filter.drop_no_boxed=true), "
            f"so it trains on math answers only, but the data gives toolcall prompts; pick math data "
            f"({_task_data_hint('math')}), a method for function calling ({methods}) or set "
            "method.episode_filter.drop_no_boxed=false."
        )


def check_init_from(init_from: str) -> None:
    """``init_from`` is a ``.ckpt`` file or a model directory (``config.json``, or a LoRA ``adapter_config.json``)."""
    path = Path(init_from).expanduser()
    fix = "point init_from at a tirl .ckpt file or an HF model directory, or set init_from=null"
    if not path.exists():
        raise ConfigError(f"init_from={init_from} does not exist (relative paths start at {Path.cwd()}); {fix}.")
    if looks_sharded(path):
        problem = sharded_checkpoint_problem(path)
        if problem:
            raise ConfigError(f"init_from: {problem}")
        return
    if path.is_dir() and not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise ConfigError(f"init_from={init_from} is a directory without config.json, so not an HF model directory; "
                          f"{fix}.")
    if path.is_file() and path.suffix != ".ckpt":
        raise ConfigError(f"init_from={init_from} is a file but not a .ckpt checkpoint; {fix}.")


def resumes_sharded(strategy: Any) -> bool:
    """Whether the ``trainer.strategy`` config loads a sharded (distributed-checkpoint) directory: Lightning's
    ``ModelParallelStrategy`` (FSDP2; ``hardware=fsdp``) or ``FSDPStrategy`` and their subclasses, or an ``fsdp*``
    registry name; not DDP, a single device or ``auto``, which would read the directory as one file."""
    target = strategy.get("_target_") if hasattr(strategy, "get") else strategy
    if not target:
        return False
    if "." not in str(target):
        return str(target).startswith("fsdp")
    try:
        from hydra.utils import get_class
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return issubclass(get_class(str(target)), (ModelParallelStrategy, FSDPStrategy))
    except Exception:   # an unimportable target fails with its own sentence when the trainer is built
        return True


def check_paths(cfg: Any, typed: TypedConfig | None) -> None:
    """Every file or directory the run reads exists: ``init_from``, ``ckpt_path`` and the data sources that are
    paths. Relative paths are read from the current directory (Hydra does not change it here)."""
    init_from = cfg.get("init_from")
    if init_from:
        check_init_from(str(init_from))
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and str(ckpt_path) not in LIGHTNING_CKPT_NAMES and looks_sharded(str(ckpt_path)):
        problem = sharded_checkpoint_problem(str(ckpt_path))
        if problem:
            raise ConfigError(f"ckpt_path: {problem}")
        if not resumes_sharded(OmegaConf.select(cfg, "trainer.strategy")):
            raise ConfigError(f"ckpt_path={ckpt_path} is a sharded checkpoint directory, which only a sharded run "
                              f"resumes; add hardware=fsdp (on a CPU: trainer.accelerator=cpu trainer.devices=2), or "
                              f"start from its weights without resuming with init_from={ckpt_path}.")
    elif ckpt_path and str(ckpt_path) not in LIGHTNING_CKPT_NAMES and not is_checkpoint_path(str(ckpt_path)):
        raise ConfigError(f"ckpt_path={ckpt_path} {NOT_A_CHECKPOINT}; point ckpt_path "
                          "at a Lightning .ckpt (or a hardware=fsdp run's .ckpt/ directory) to resume (init_from starts "
                          "from a checkpoint's weights without resuming), or set ckpt_path=null.")
    if ckpt_path and str(ckpt_path) not in LIGHTNING_CKPT_NAMES:
        check_resume_fits(cfg, str(ckpt_path))
    if typed is None:
        return
    for split in ("train", "val", "test"):
        spec = getattr(typed.data, split)
        if is_local_path(spec) and not Path(spec).expanduser().exists():
            raise ConfigError(f"data.{split}={spec} does not exist (relative paths start at {Path.cwd()}); point "
                              f"data.{split} at a .jsonl/.parquet file or a directory of them, or use hf:<dataset id>.")


def _setting(hparams: dict, key: str) -> Any:
    node: Any = hparams
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_resume_fits(cfg: Any, ckpt_path: str) -> None:
    """The run's weights have the same names as those ``ckpt_path`` holds, so Lightning's strict load fits: a LoRA
    adapter (``model.lora.enabled``; for LoRA also its ``r`` and ``target_modules``) and a full fine-tune's KL
    reference copy (``frozen_ref.*``, kept when ``method.loss.kl_coef`` != 0) on both sides or on neither. Read from
    the checkpoint's key names and saved hyper-parameters (``checkpoint_layout``), not its weights."""
    try:
        keys, hparams = checkpoint_layout(ckpt_path)
    except ValueError as err:
        raise ConfigError(f"ckpt_path: {err}") from None
    fix = f"resume with the same setting, or start a new run from its weights with init_from={ckpt_path}"
    run_lora = bool(OmegaConf.select(cfg, "model.lora.enabled", default=False))
    ckpt_lora = any(".lora_A." in k for k in keys if k.startswith("policy."))
    if run_lora != ckpt_lora:
        raise ConfigError(f"ckpt_path={ckpt_path} was written with model.lora.enabled={str(ckpt_lora).lower()} but "
                          f"this run has model.lora.enabled={str(run_lora).lower()}; {fix}.")
    if run_lora:
        for key in ("r", "target_modules"):
            was, now = _setting(hparams, f"model.lora.{key}"), OmegaConf.select(cfg, f"model.lora.{key}")
            now = OmegaConf.to_object(now) if OmegaConf.is_config(now) else now
            if was is not None and now is not None and (sorted(was) if key == "target_modules" else was) != \
                    (sorted(now) if key == "target_modules" else now):
                raise ConfigError(f"ckpt_path={ckpt_path} was written with model.lora.{key}={was} but this run has "
                                  f"model.lora.{key}={now}; {fix}.")
    kl_coef = OmegaConf.select(cfg, "method.loss.kl_coef", default=0.0) or 0.0
    run_ref = OmegaConf.select(cfg, "method.kind", default="rl") == "rl" and kl_coef != 0 and not run_lora
    ckpt_ref = any(k.startswith("frozen_ref.") for k in keys)
    if run_ref != ckpt_ref:
        was = _setting(hparams, "method.loss.kl_coef")
        was = f"method.loss.kl_coef={was}" if was is not None else "method.loss.kl_coef" + ("!=0" if ckpt_ref else "=0")
        copy = "with" if ckpt_ref else "without"
        raise ConfigError(f"ckpt_path={ckpt_path} was written with {was} ({copy} a KL reference copy) but this run has "
                          f"method.loss.kl_coef={kl_coef}" + ("" if run_ref == bool(kl_coef) else
                          f" and method.kind={OmegaConf.select(cfg, 'method.kind')}") + f"; {fix}.")


def check_step_counts(cfg: Any, typed: TypedConfig) -> None:
    """Trainer counts that would silently misbehave under a round of k optimizer steps (issue 18). Lightning's
    ``global_step`` moves k at a time, so ``trainer.max_steps`` (and the LR decay over it) and a checkpoint's
    ``every_n_train_steps`` must be multiples of k; ``trainer.val_check_interval`` is in optimizer steps too (tirl
    hands Lightning ``val_check_interval / k`` rounds, ``lightning_step_counts``). A decaying LR needs max_steps."""
    from tirl.rl.schedule import steps_per_round

    m = typed.method
    if m.kind != "rl":
        return
    k = steps_per_round(m.rollout_batch_size, m.mini_batch_size, m.ppo_epochs)
    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps", -1)
    why = (f"one rollout round is {k} optimizer steps (method.rollout_batch_size={m.rollout_batch_size} / "
           f"mini_batch_size={m.mini_batch_size or m.rollout_batch_size} x ppo_epochs={m.ppo_epochs})")
    if m.lr_schedule != "constant" and not (isinstance(max_steps, int) and max_steps > 0):
        raise ConfigError(f"method.lr_schedule={m.lr_schedule} decays over trainer.max_steps, which is {max_steps}; "
                          f"set trainer.max_steps (a multiple of {k}) or method.lr_schedule=constant.")
    counts = {"trainer.max_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else None}
    interval = trainer.get("val_check_interval")
    counts["trainer.val_check_interval"] = interval if isinstance(interval, int) and not isinstance(interval, bool) \
        else None
    for name, cb in (cfg.get("callbacks") or {}).items():
        every = cb.get("every_n_train_steps") if hasattr(cb, "get") else None
        counts[f"callbacks.{name}.every_n_train_steps"] = every or None
    for key, value in counts.items():
        if value is not None and value % k:
            fix = max(k, round(value / k) * k)
            raise ConfigError(f"{key}={value} is not a multiple of {k}: {why}, and tirl counts it in optimizer steps; "
                              f"set {key}={fix}.")


def lightning_step_counts(cfg: Any, typed: TypedConfig) -> dict[str, Any]:
    """Trainer arguments to override so Lightning's batch-counted ones mean optimizer steps: an integer
    ``val_check_interval`` (Lightning counts training batches, i.e. rounds) becomes ``val_check_interval / k``."""
    from tirl.rl.schedule import steps_per_round

    m = typed.method
    interval = (cfg.get("trainer") or {}).get("val_check_interval")
    if m.kind != "rl" or not isinstance(interval, int) or isinstance(interval, bool):
        return {}
    k = steps_per_round(m.rollout_batch_size, m.mini_batch_size, m.ppo_epochs)
    return {"val_check_interval": max(1, interval // k)} if k > 1 else {}


def preflight_train(cfg: Any, typed: TypedConfig, config_dir: Path) -> None:
    """All start checks of a training run (``tirl.train.run``), in the order a user would fix them."""
    check_method_data(typed, config_dir)
    check_paths(cfg, typed)
    check_step_counts(cfg, typed)
