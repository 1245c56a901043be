"""Check a composed config against the typed schemas and turn each group into its dataclass.

Every problem a user can cause here ends in one sentence that names the dotted key and the valid choices:
a misspelled key (with the closest valid name), a value of the wrong type, a value outside an enum, or a
required value left at ``???``. The command line itself is checked before Hydra runs by ``tirl.config.overrides``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tirl.config.schema import (
    BFCLTaskConfig,
    DataConfig,
    HFBackendConfig,
    HTTPBackendConfig,
    MathTaskConfig,
    MethodConfig,
    ModelConfig,
    RolloutConfig,
    SandboxConfig,
    VLLMBackendConfig,
)
from tirl.config.tasks import TASK_REWARDS, TASKS, data_task, is_local_path
from tirl.errors import UserError


class ConfigError(UserError, ValueError):
    """A config the user wrote or composed is invalid; the message says what and how to fix it."""


@dataclass
class TypedConfig:
    """The schema-checked groups that the datamodule and the modules receive."""

    model: ModelConfig
    method: MethodConfig
    data: DataConfig
    rollout: RolloutConfig
    sandbox: SandboxConfig


SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "sandbox": SandboxConfig,
}

# Groups whose options each have their own shape: (group, option) → schema, registered as <group>/_schema_<option>.
OPTION_SCHEMAS: dict[tuple[str, str], type] = {
    ("task", "math"): MathTaskConfig,
    ("task", "bfcl"): BFCLTaskConfig,
    ("backend", "hf"): HFBackendConfig,
    ("backend", "http"): HTTPBackendConfig,
    ("backend", "vllm"): VLLMBackendConfig,
}

# Keys whose value must be one of a few names (dotted path from the config root); a None value passes where the
# schema allows None (e.g. data.task). Names that tirl/rl/core.py selects from a registry are read from it
# (``registry_choices``), so a name core accepts is never refused here.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "model.tool_prompt": ("system", "template"),
    "method.kind": ("rl", "sft"),
    "method.lr_schedule": ("constant", "cosine", "linear"),
    "method.metric_mode": ("max", "min"),
    "method.loss.nll_norm": ("tokens", "positive"),
    "method.old_log_probs": ("rollout", "recompute"),
    "method.rollout_correction.kind": ("none", "tis"),
    "method.shaping.kind": ("none", "da_grpo"),
    "method.loss_on": ("assistant", "last_assistant"),
    "rollout.backend": ("hf", "vllm"),
    "sandbox.kind": ("local", "fusion"),
    "data.on_bad_line": ("error", "skip"),
    "data.task": TASKS,
}


@functools.cache
def registry_choices() -> dict[str, tuple[str, ...]]:
    """Choices of the keys that name an entry of a registry in ``tirl.rl.core`` (imported on first use: torch)."""
    from tirl.rl import core

    return {
        "method.advantage.scale": tuple(core.ADVANTAGE_SCALES),
        "method.loss.agg": tuple(core.LOSS_AGGREGATIONS),
        "method.loss.kl_kind": tuple(core.KL_ESTIMATORS),
    }


# Numeric keys with a range (dotted path → (lowest, highest, whether the lowest itself is allowed)).
BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "method.lr": (0, None, False),
    "method.group_size": (1, None, True),
    "method.rollout_batch_size": (1, None, True),
    "method.micro_batch_size": (1, None, True),
    "method.micro_batch_tokens": (1, None, True),
    "method.ppo_epochs": (1, None, True),
    "method.val_samples": (1, None, True),
    "method.loss.clip_low": (0, None, True),
    "method.loss.clip_high": (0, None, True),
    "method.rollout_correction.cap": (0, None, False),
    "method.loss.kl_coef": (0, None, True),
    "data.batch_size": (1, None, True),
    "data.max_length": (1, None, True),
    "data.val_size": (0, None, True),
    "rollout.max_prompt_tokens": (1, None, True),
    "rollout.max_new_tokens": (1, None, True),
    "rollout.max_total_tokens": (1, None, True),
    "rollout.temperature": (0, None, True),
    "rollout.top_p": (0, 1, False),
    "rollout.top_k": (0, None, True),
    "rollout.max_tool_rounds": (0, None, True),
    "sandbox.workers": (1, None, True),
    "sandbox.timeout_s": (0, None, False),
}

# Top-level keys of train.yaml / eval.yaml besides the schema groups; anything else is a typo.
TOP_LEVEL_KEYS: frozenset[str] = frozenset(
    {"task_name", "tags", "seed", "init_from", "ckpt_path", "train", "test", "optimized_metric", "validate_before_fit",
     "trainer", "callbacks", "logger", "paths", "hydra", *SCHEMAS}
)


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    """Field name → resolved type hint (the schema module uses postponed annotations)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _nested_schema(hint: Any) -> type | None:
    """The dataclass a field holds (also through ``X | None``), or None for leaves, dicts and Any."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def unknown_key_message(path: str, key: str, valid: Sequence[str]) -> str:
    """One sentence: the unknown dotted key, the closest valid name and all valid names."""
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" did you mean '{close[0]}'?" if close else ""
    return f"Unknown config key '{full}';{hint} Valid keys: {', '.join(sorted(valid))}."


def check_key_path(path: Sequence[str], schema: type, prefix: str) -> None:
    """Raise ConfigError if the dotted key ``prefix.path`` does not exist in ``schema`` (dicts end the check)."""
    fields = _field_types(schema)
    head, rest = path[0], path[1:]
    if head not in fields:
        raise ConfigError(unknown_key_message(prefix, head, list(fields)))
    nested = _nested_schema(fields[head])
    if rest and nested is not None:
        check_key_path(rest, nested, f"{prefix}.{head}")


def _check_keys(node: Mapping, schema: type, prefix: str) -> None:
    """Every key of a user mapping must be a field of ``schema``, recursively into nested dataclasses."""
    fields = _field_types(schema)
    for key, value in node.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(prefix, str(key), list(fields)))
        nested = _nested_schema(fields[key])
        if nested is not None and isinstance(value, Mapping):
            _check_keys(value, nested, f"{prefix}.{key}")


def _expected_type(schema: type, dotted: str) -> str:
    hint: Any = schema
    for part in dotted.split("."):
        nested = _nested_schema(hint)
        if nested is None or part not in _field_types(nested):
            return "a different type"
        hint = _field_types(nested)[part]
    return _type_name(hint)


def _to_dataclass(group: str, node: Any, schema: type) -> Any:
    """Merge a group's values into its schema, check keys, types and required values; return the dataclass."""
    if node is None:
        return schema()
    if not isinstance(node, Mapping):
        raise ConfigError(f"Config group '{group}' must be a mapping of keys to values, got {type(node).__name__}.")
    _check_keys(node, schema, group)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        sub = str(getattr(err, "full_key", "") or "")
        key = f"{group}.{sub}" if sub else group
        got = getattr(err, "value", None)
        raise ConfigError(
            f"Config key '{key}' got {got!r} ({type(got).__name__}) but expects {_expected_type(schema, sub)}."
        ) from None


def _check_choices(typed: TypedConfig) -> None:
    for dotted, allowed in {**CHOICES, **registry_choices()}.items():
        obj: Any = typed
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj is not None and obj not in allowed:
            raise ConfigError(f"Config key '{dotted}' is {obj!r}; valid choices: {', '.join(allowed)}.")


def _check_bounds(typed: TypedConfig) -> None:
    for dotted, (low, high, low_ok) in BOUNDS.items():
        obj: Any = typed
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj is None:   # an optional key left unset (e.g. method.micro_batch_tokens: null)
            continue
        if (obj < low or (obj == low and not low_ok)) or (high is not None and obj > high):
            span = f"{'at least' if low_ok else 'above'} {low}" + (f" and at most {high}" if high is not None else "")
            raise ConfigError(f"Config key '{dotted}' is {obj!r}; it must be {span}.")
    _check_schedule(typed.method)
    if typed.method.kind == "rl" and typed.method.group_size < 2:
        raise ConfigError(f"Config key 'method.group_size' is {typed.method.group_size}; GRPO compares samples within "
                          "a group, so RL needs at least 2.")


def _check_schedule(method: MethodConfig) -> None:
    """The update schedule's keys fit together (issue 18); the world-size checks wait for the trainer."""
    from tirl.rl.schedule import ScheduleError, mini_batches_per_round

    if method.mini_batch_size is not None and method.mini_batch_size < 1:
        raise ConfigError(f"Config key 'method.mini_batch_size' is {method.mini_batch_size}; it must be at least 1, "
                          "or null for one optimizer step per round.")
    try:
        mini_batches_per_round(method.rollout_batch_size, method.mini_batch_size)
    except ScheduleError as err:
        raise ConfigError(str(err)) from None
    if method.rollout_correction.kind != "none" and method.old_log_probs != "recompute":
        raise ConfigError(f"method.rollout_correction.kind={method.rollout_correction.kind} weighs the trainer's "
                          "recomputed log-probs against the sampler's; set method.old_log_probs=recompute too.")


def _group_values(cfg: DictConfig, group: str) -> Any:
    """A group's values with interpolations resolved against the whole config (missing stays ???)."""
    node = cfg.get(group)
    if isinstance(node, DictConfig):
        for key in sorted(OmegaConf.missing_keys(node)):  # full dotted keys, e.g. data.train
            raise ConfigError(
                f"Config value '{key}' is required (it is ???); set it on the command line, e.g. {key}=<value>."
            )
        try:
            return OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"Config group '{group}' could not be resolved: {str(err).splitlines()[0]}.") from None
    return node


def _reward_from_task(method: Any, data: DataConfig, training: bool) -> None:
    """Fill in ``method.reward.name`` (the method group's values, before they become a dataclass) from the data's
    task when the method names no reward. A training run whose task nothing tells stops here in one sentence."""
    if not isinstance(method, dict) or method.get("kind", "rl") != "rl":
        return
    reward = method.setdefault("reward", {})
    if not isinstance(reward, dict) or reward.get("name") is not None:
        return
    task = data_task(data)
    if task is not None:
        reward["name"] = TASK_REWARDS[task]
    elif training and data.train is not None and not (is_local_path(data.train) and not Path(str(data.train)).exists()):
        raise ConfigError(f"Which task data.train={data.train} holds is not known (it picks the reward); set "
                          "data.task=math or data.task=toolcall, or name the reward: method.reward.name=<reward>.")


def validate(cfg: DictConfig) -> TypedConfig:
    """Check ``cfg`` (composed by Hydra) against the schemas; return the typed groups or raise ConfigError."""
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(unknown_key_message("", str(key), sorted(TOP_LEVEL_KEYS)))
    nodes = {name: _group_values(cfg, name) for name in SCHEMAS}
    data = _to_dataclass("data", nodes["data"], DataConfig)
    _reward_from_task(nodes["method"], data, training=bool(cfg.get("train", False)))
    groups = {name: data if name == "data" else _to_dataclass(name, nodes[name], schema)
              for name, schema in SCHEMAS.items()}
    typed = TypedConfig(**groups)
    _check_choices(typed)
    _check_bounds(typed)
    # yaml `???` merged onto a schema default keeps the default (None), so required values are checked here
    if typed.sandbox.kind == "fusion" and not typed.sandbox.url:
        raise ConfigError("sandbox=fusion needs the server address: 'sandbox.url' is required; set sandbox.url=http://host:port.")
    if typed.sandbox.kind == "local" and typed.sandbox.require_isolation:   # before any model is loaded
        from tirl.tools.sandbox import SandboxIsolationError, check_isolation

        try:
            check_isolation(require=True)
        except SandboxIsolationError as err:
            raise ConfigError(str(err)) from None
    if cfg.get("train", False) and typed.data.train is None:   # eval.yaml has no train stage
        raise ConfigError("Config value 'data.train' is required for training; set it on the command line, "
                          "e.g. data.train=<value>.")
    return typed


def check_trainer_keys(trainer_cfg: Mapping) -> None:
    """Name a misspelled Trainer argument before Lightning's TypeError does (imports lightning)."""
    import inspect

    from lightning.pytorch import Trainer

    valid = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in trainer_cfg:
        if key != "_target_" and key not in valid:
            raise ConfigError(unknown_key_message("trainer", str(key), valid))


def check_value_type(group: str, path: Sequence[str], value: str) -> None:
    """A command-line value must convert to its schema field's type (Hydra merges overrides into the schema)."""
    try:
        OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), OmegaConf.from_dotlist([f"{'.'.join(path)}={value}"]))
    except OmegaConfBaseException:
        dotted = ".".join(path)
        raise ConfigError(
            f"Config key '{group}.{dotted}' got '{value}' (str) but expects {_expected_type(SCHEMAS[group], dotted)}."
        ) from None
