"""Check a command line before Hydra composes it: an unknown group option (``method=thorr``) or key
(``method.loss.clip_hgih=1``) ends in one sentence naming the closest valid one; a valid key absent from the yaml
(a Trainer argument, an entry of a dict field) gets Hydra's ``++`` so no key needs a ``+``."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tirl.config.schema import EVAL_TASKS as TASKS
from tirl.config.validate import (
    SCHEMAS,
    ConfigError,
    _field_types,
    _nested_schema,
    check_key_path,
    check_value_type,
    unknown_key_message,
)


def group_options(config_dir: Path, group: str) -> list[str]:
    """Option names of a config group directory (yaml files, nested ones as sub/path)."""
    root = config_dir / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def check_overrides(argv: Sequence[str], config_dir: Path, config_name: str | None = None) -> list[str]:
    """Reject an unknown group option (``method=thorr``) or key (``method.loss.clip_hgih=1``, ``trainer.max_stepz=5``,
    ``init_form=x``) in argv; return argv with ``++`` added where a valid key is absent from the yaml.

    Hydra would reject these too, with a multi-line message advising ``+key`` (wrong advice for a typo); this names
    the closest valid key in one sentence. With ``config_name`` (the entry point's primary config), keys outside the
    schema groups are checked against the composed config as well, and a key that is valid but not in any yaml — a
    Trainer argument such as ``trainer.gradient_clip_val``, an entry of a dict field such as
    ``task.bench_paths.math500`` — is passed on as ``++key=value``, so no key needs a ``+`` on the command line.
    Sweep syntax (``a,b``) is checked per item; functions like ``choice(...)`` and interpolations are left to Hydra.
    """
    _check_groups_and_schema_keys(argv, config_dir)
    if config_name is None:
        return list(argv)
    return _check_other_keys(argv, config_dir, config_name)


def _plain_key(arg: str) -> str | None:
    """The dotted key of a ``key=value`` override without ``+``/``~`` and outside ``hydra.*`` (else None)."""
    if arg.startswith(("-", "+", "~")) or "=" not in arg:
        return None
    key = arg.split("=", 1)[0]
    return None if key.startswith("hydra") or "@" in key else key


def _compose_choices(argv: Sequence[str], config_dir: Path, config_name: str) -> DictConfig:
    """The primary config composed with the argv's group choices only (first item of a sweep), to read its keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    choices = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if (config_dir / key.lstrip("+~").split("@", 1)[0]).is_dir():
            choices.append(f"{key}={value.split(',', 1)[0]}" if not any(c in value for c in "([") else f"{key}={value}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name, overrides=choices)
    finally:
        GlobalHydra.instance().clear()


def _open_dict(path: Sequence[str], cfg: DictConfig) -> bool:
    """Whether the node at ``path`` is a dict field of a schema (any key allowed): ``method.reward.kwargs``,
    ``method.module``, eval's ``task.bench_paths``."""
    schema: Any
    if path and path[0] in SCHEMAS:
        schema, rest = SCHEMAS[path[0]], path[1:]
    elif path and path[0] == "task" and OmegaConf.select(cfg, "task.name") is not None:
        schema, rest = TASKS.get(str(cfg.task.name)), path[1:]
    else:
        return False
    hint: Any = schema
    for part in rest:
        nested = _nested_schema(hint)
        if nested is None or part not in _field_types(nested):
            return False
        hint = _field_types(nested)[part]
    return typing.get_origin(hint) is dict or hint is dict


def _trainer_arguments() -> list[str]:
    import inspect

    from lightning.pytorch import Trainer

    return [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]


def _check_other_keys(argv: Sequence[str], config_dir: Path, config_name: str) -> list[str]:
    keyed = [(arg, _plain_key(arg)) for arg in argv]
    if not any(key and not (config_dir / key).is_dir() for _, key in keyed):
        return list(argv)   # only group choices: nothing to look up, no compose
    cfg = _compose_choices(argv, config_dir, config_name)
    out = []
    for arg, key in keyed:
        if key is None or (config_dir / key).is_dir():
            out.append(arg)
            continue
        parts = key.split(".")
        node: Any = cfg
        for depth, part in enumerate(parts):
            if not isinstance(node, DictConfig):
                break   # a list index or a leaf replaced by a mapping: left to Hydra
            if part in node:
                node = node._get_node(part)
                continue
            path = parts[:depth]
            if path == ["trainer"] and depth == len(parts) - 1:
                valid = _trainer_arguments()
                if part not in valid:
                    raise ConfigError(unknown_key_message("trainer", part, valid))
                arg = "++" + arg   # a Lightning Trainer argument the yaml does not set
            elif _open_dict(path, cfg):
                arg = "++" + arg   # a new entry of a dict field, e.g. task.bench_paths.<bench>
            else:
                raise ConfigError(unknown_key_message(".".join(path), part, [str(k) for k in node]))
            break
        out.append(arg)
    return out


def _check_groups_and_schema_keys(argv: Sequence[str], config_dir: Path) -> None:
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        deleting = key.startswith("~")
        key = key.lstrip("+~").split("@", 1)[0]
        if key.startswith("hydra") or any(c in value for c in "([{$"):
            continue
        if (config_dir / key).is_dir():
            if deleting or value in ("", "null"):
                continue
            options = group_options(config_dir, key)
            for option in value.split(","):
                if option not in options:
                    close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
                    hint = f" did you mean '{close[0]}'?" if close else ""
                    raise ConfigError(
                        f"Unknown option '{option}' for config group '{key}';{hint} Valid choices: {', '.join(options)}."
                    )
        elif "." in key and key.split(".", 1)[0] in SCHEMAS:
            group, *path = key.split(".")
            check_key_path(path, SCHEMAS[group], group)
            for item in value.split(","):
                check_value_type(group, path, item)
