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

from tirl.config.validate import ConfigError, TypedConfig

# What each datamodule feeds: SFT chat samples or RL prompts (a user's own datamodule is not checked).
DATAMODULE_KINDS: dict[str, str] = {
    "tirl.data.datamodules.SFTDataModule": "sft",
    "tirl.data.datamodules.RLPromptDataModule": "rl",
}
# The task each reward scores; a source with a known task (synthetic, BFCL) must match it.
REWARD_TASKS: dict[str, str] = {"math": "math", "toolcall": "toolcall", "toolcall_exact": "toolcall"}
# Lightning's own names for a checkpoint to resume (not paths).
LIGHTNING_CKPT_NAMES = frozenset({"last", "best", "hpc", "registry"})


def source_task(spec: Any) -> str | None:
    """The task of a data source whose kind its name tells: ``synthetic:math`` → math, ``synthetic:toolcall`` and
    ``bfcl:<category>`` → toolcall; None for files and HF datasets (their records say)."""
    if not isinstance(spec, str):
        return None
    if spec.startswith("synthetic:"):
        name = spec.removeprefix("synthetic:")
        return name if name in ("math", "toolcall") else None
    return "toolcall" if spec.startswith("bfcl:") else None


def is_local_path(spec: Any) -> bool:
    """A data source that names a file or directory (everything but ``synthetic:``, ``bfcl:`` and ``hf:`` specs)."""
    return isinstance(spec, str) and not spec.startswith(("synthetic:", "bfcl:", "hf:"))


@functools.cache
def _group_yamls(config_dir: Path, group: str) -> dict[str, Any]:
    """Option name → its yaml (as written, not composed) for the options of a config group."""
    root = config_dir / group
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted(root.glob("*.yaml"))
            if not p.stem.startswith("_")}


def data_groups(config_dir: Path, kind: str) -> list[str]:
    """``data=`` options whose datamodule feeds ``kind`` (sft | rl), file ones first."""
    names = [name for name, node in _group_yamls(config_dir, "data").items()
             if DATAMODULE_KINDS.get(str(node.get("_target_"))) == kind]
    return sorted(names, key=lambda n: ("jsonl" not in n, n))


def method_groups(config_dir: Path, task: str) -> list[str]:
    """RL ``method=`` options whose reward scores ``task`` (the schema's default reward is math)."""
    out = []
    for name, node in _group_yamls(config_dir, "method").items():
        reward = (node.get("reward") or {}).get("name", "math")
        if node.get("kind", "rl") == "rl" and REWARD_TASKS.get(reward) == task:
            out.append(name)
    return out


def _data_hint(config_dir: Path, kind: str) -> str:
    return ", ".join(f"data={n}" + (" data.train=<file>" if "jsonl" in n else "") for n in data_groups(config_dir, kind))


def check_method_data(typed: TypedConfig, config_dir: Path) -> None:
    """The method trains on what the data gives: SFT samples for ``method.kind=sft``, RL prompts for ``rl`` whose
    task (where the source's name tells it) is the one the reward scores."""
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
    wanted = REWARD_TASKS.get(method.reward.name)
    for split in ("train", "val", "test"):
        spec = getattr(data, split)
        got = source_task(spec)
        if wanted and got and got != wanted:
            data_pick = "data=synthetic_toolcall, data=bfcl" if wanted == "toolcall" else "data=synthetic_math"
            methods = ", ".join(f"method={m}" for m in method_groups(config_dir, got))
            raise ConfigError(
                f"method={method.name} scores {wanted} answers (method.reward.name={method.reward.name}) but "
                f"data.{split}={spec} gives {got} prompts; pick {wanted} data ({data_pick} or data=jsonl "
                f"data.train=<your {wanted} file>) or a {got} method ({methods})."
            )


def check_init_from(init_from: str) -> None:
    """``init_from`` is a ``.ckpt`` file or a model directory (``config.json``, or a LoRA ``adapter_config.json``)."""
    path = Path(init_from).expanduser()
    fix = "point init_from at a tirl .ckpt file or an HF model directory, or set init_from=null"
    if not path.exists():
        raise ConfigError(f"init_from={init_from} does not exist (relative paths start at {Path.cwd()}); {fix}.")
    if path.is_dir() and not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise ConfigError(f"init_from={init_from} is a directory without config.json, so not an HF model directory; "
                          f"{fix}.")
    if path.is_file() and path.suffix != ".ckpt":
        raise ConfigError(f"init_from={init_from} is a file but not a .ckpt checkpoint; {fix}.")


def check_paths(cfg: Any, typed: TypedConfig | None) -> None:
    """Every file or directory the run reads exists: ``init_from``, ``ckpt_path`` and the data sources that are
    paths. Relative paths are read from the current directory (Hydra does not change it here)."""
    init_from = cfg.get("init_from")
    if init_from:
        check_init_from(str(init_from))
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and str(ckpt_path) not in LIGHTNING_CKPT_NAMES and not Path(str(ckpt_path)).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} is not a file; point ckpt_path at a Lightning .ckpt to resume "
                          "(init_from starts from a checkpoint's weights without resuming), or set ckpt_path=null.")
    if typed is None:
        return
    for split in ("train", "val", "test"):
        spec = getattr(typed.data, split)
        if is_local_path(spec) and not Path(spec).expanduser().exists():
            raise ConfigError(f"data.{split}={spec} does not exist (relative paths start at {Path.cwd()}); point "
                              f"data.{split} at a .jsonl/.parquet file or a directory of them, or use hf:<dataset id>.")


def preflight_train(cfg: Any, typed: TypedConfig, config_dir: Path) -> None:
    """All start checks of a training run (``tirl.train.run``), in the order a user would fix them."""
    check_method_data(typed, config_dir)
    check_paths(cfg, typed)
