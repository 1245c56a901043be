"""The check of a composed eval config; the typed task schemas (``configs/task/{math,bfcl}.yaml``) are in
``tirl.config.schema``.

eval.yaml has a few keys train.yaml does not (``task``, ``bench``, ``device``); the shared groups (model, rollout,
sandbox, ...) are checked by ``tirl.config.validate`` exactly as for training, the task here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tirl.config import ConfigError, TypedConfig, validate
from tirl.config.schema import EVAL_TASKS as TASKS
from tirl.config.schema import MATH_BENCHMARKS, BFCLTaskConfig, MathTaskConfig
from tirl.config.validate import _group_values, _to_dataclass, unknown_key_message

__all__ = ["MATH_BENCHMARKS", "TASKS", "BFCLTaskConfig", "MathTaskConfig", "check_eval_sources", "validate_eval"]
EVAL_TOP_LEVEL_KEYS = frozenset({"task_name", "tags", "seed", "init_from", "device", "bench", "task", "model",
                                 "method", "rollout", "sandbox", "logger", "paths", "hydra"})
SHARED_KEYS = ("task_name", "tags", "seed", "init_from", "model", "method", "rollout", "sandbox", "logger", "paths")


def validate_eval(cfg: DictConfig) -> tuple[TypedConfig, MathTaskConfig | BFCLTaskConfig]:
    """Check a composed eval config; return the typed shared groups and the typed task (ConfigError if not)."""
    for key in cfg:
        if key not in EVAL_TOP_LEVEL_KEYS:
            raise ConfigError(unknown_key_message("", str(key), sorted(EVAL_TOP_LEVEL_KEYS)))
    typed = validate(OmegaConf.masked_copy(cfg, [k for k in SHARED_KEYS if k in cfg]))
    node: Any = _group_values(cfg, "task")
    if not isinstance(node, dict) or node.get("name") not in TASKS:
        raise ConfigError(f"Config group 'task' must be one of {', '.join(TASKS)}; set task=math or task=bfcl.")
    if cfg.get("bench") is not None:   # `bench=[math500,aime24]` on the command line: the task's benchmarks
        if node["name"] != "math":
            raise ConfigError("'bench' selects math benchmarks; use it with task=math (BFCL takes task.categories).")
        bench = cfg.bench
        node["bench"] = [bench] if isinstance(bench, str) else list(bench)
    task = _to_dataclass("task", node, TASKS[node["name"]])
    _check_task(task)
    return typed, task


def _check_task(task: MathTaskConfig | BFCLTaskConfig) -> None:
    if isinstance(task, MathTaskConfig):
        for name in task.bench:
            if name not in MATH_BENCHMARKS and name not in task.bench_paths:
                raise ConfigError(f"Unknown math benchmark '{name}'; valid choices: {', '.join(MATH_BENCHMARKS)} "
                                  "(or give its file with task.bench_paths.<name>=path).")
        if task.n_samples < 1:
            raise ConfigError(f"task.n_samples is {task.n_samples}; it must be at least 1.")
        too_big = [k for k in task.pass_k if not 1 <= k <= task.n_samples]
        if too_big:
            raise ConfigError(f"task.pass_k holds {too_big} but pass@k needs 1 <= k <= task.n_samples "
                              f"({task.n_samples}); raise task.n_samples or drop those k.")
    else:
        from tirl.data.bfcl_files import BFCLDataError, canonical_category

        for name in task.categories:
            try:
                canonical_category(name)
            except BFCLDataError as err:
                raise ConfigError(str(err)) from None
    if task.batch_size < 1:
        raise ConfigError(f"task.batch_size is {task.batch_size}; it must be at least 1.")


def check_eval_sources(task: MathTaskConfig | BFCLTaskConfig) -> None:
    """Every benchmark source the task reads can be found, before a model loads or anything is generated: a missing
    file in ``task.bench_dir`` or ``task.bench_paths`` fails here, not after the benchmarks before it were generated
    (hub ids are fetched when read). BFCL: the installed package's data or the ``task.source`` directory exists."""
    if isinstance(task, MathTaskConfig):
        from tirl.benchmarks.math_bench import resolve_source

        for name in task.bench:
            resolve_source(name, task.bench_dir, task.bench_paths.get(name))
    elif task.source == "package":
        from tirl.data.bfcl_files import package_data_dir

        package_data_dir()
    elif not Path(task.source).expanduser().is_dir():
        raise ConfigError(f"task.source={task.source} is not a directory; point it at a directory of BFCL_v4_*.json "
                          "files, or use task.source=package with bfcl-eval installed (scripts/install_bfcl.sh).")
