"""Config: typed schemas, validation of a composed Hydra config, the task wrapper, the configs directory."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirl.config.overrides import check_overrides
from tirl.config.validate import ConfigError, TypedConfig, check_trainer_keys, validate
from tirl.config.wrapper import register_loggers, task_wrapper
from tirl.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def runnable(cfg, output_dir) -> DictConfig:
    """A config composed with ``hydra.compose(..., return_hydra_config=True)`` made ready for ``tirl.train.run`` /
    ``tirl.evaluate.run`` outside ``@hydra.main`` (scripts, tests, notebooks): Hydra's runtime config is
    registered (``${hydra:...}`` in paths reads it), outputs go to ``output_dir``, every interpolation is resolved."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)   # Hydra sets it only when a job really starts
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def register_schemas() -> None:
    """Each group's yaml extends its dataclass (``defaults: [_schema, _self_]``), so every schema key can be
    overridden from the command line — ``method=dcore method.step_level.enabled=true`` — with no ``+``."""
    from hydra.core.config_store import ConfigStore

    from tirl.config.validate import OPTION_SCHEMAS, SCHEMAS

    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name="_schema", node=schema)
    for (group, option), schema in OPTION_SCHEMAS.items():   # groups whose options differ in shape: one per option
        store.store(group=group, name=f"_schema_{option}", node=schema)


register_schemas()

# The yaml tree lives in the source checkout next to src/ (console scripts work from an editable install).
CONFIG_DIR: Path = Path(__file__).resolve().parents[3] / "configs"


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turn any ``UserError`` (config, data, path, missing package or device) into its one sentence on stderr
    and exit status 2, with no traceback unless ``HYDRA_FULL_ERROR=1``.

    In a multirun job it is re-raised instead, so the sweeper records a failed job and goes on.
    """
    try:
        yield
    except UserError as err:
        if _in_multirun():
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        prefix = "Config error" if isinstance(err, ConfigError) else "Error"
        print(f"{prefix}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_on_bad_overrides(config_name: str | None = None, argv: list[str] | None = None,
                          config_dir: Path = CONFIG_DIR) -> None:
    """Check command-line overrides before Hydra composes (unknown group option or key → exit 2); with
    ``config_name`` (the entry point's primary config), rewrite ``sys.argv`` so valid keys absent from the yaml
    get Hydra's ``++`` (see ``check_overrides``). ``--help`` hides the schema entry of each group."""
    args = sys.argv[1:] if argv is None else argv
    with exit_on_config_error():
        checked = check_overrides(args, config_dir, config_name)
    if argv is None:
        sys.argv[1:] = checked
    if "--help" in args or "-h" in args:
        _hide_schema_in_help()


def hydra_entry(config_name: str, run: Callable[[DictConfig], Any],
                precheck: Callable[[], None] | None = None) -> Any:
    """Every entry point, ``python src/<name>.py`` and the ``tirl-<name>`` console scripts alike: check the
    command line before Hydra composes ``configs/<config_name>.yaml`` (``precheck``, default
    ``exit_on_bad_overrides``: an unknown group option or key is one sentence, exit 2), then return ``run(cfg)``
    with a user's mistake turned into one sentence (``exit_on_config_error``). The Hydra job is named
    ``config_name`` (its log file, ``hydra.job.name``) whichever script started it."""
    import hydra

    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        raise SystemExit(f"tirl needs the configs/ directory of a source checkout (looked in {CONFIG_DIR}); install "
                         f"with `pip install -e .` from the repository or run `python src/{config_name}.py`.")
    if precheck is None:
        exit_on_bad_overrides(config_name)
    else:
        with exit_on_config_error():
            precheck()

    def task(cfg: DictConfig) -> Any:
        with exit_on_config_error():
            return run(cfg)

    task.__module__ = config_name   # Hydra names the job after the task function's module
    return hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)()


def _hide_schema_in_help() -> None:
    """Drop the ``_schema`` (and ``_schema_<option>``) options from the groups ``--help`` lists: it is the typed base every option of a group
    extends (``register_schemas``), not a choice. Hydra has no switch for this, so its group listing is filtered;
    should a Hydra release rename the method, help simply lists ``_schema`` again."""
    import re

    from hydra._internal import hydra as hydra_internal

    original = getattr(hydra_internal.Hydra, "format_config_groups", None)
    if original is None or getattr(original, "hides_schema", False):
        return

    def format_config_groups(self, predicate, compact: bool = True) -> str:
        text = original(self, predicate, compact)
        return re.sub(r"(?m)(?<=[:,] )_schema\w*(, |$)|^\s*_schema\w*\n", "", text)

    format_config_groups.hides_schema = True
    hydra_internal.Hydra.format_config_groups = format_config_groups


__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "TypedConfig",
    "UserError",
    "check_overrides",
    "check_trainer_keys",
    "exit_on_bad_overrides",
    "exit_on_config_error",
    "hydra_entry",
    "register_loggers",
    "task_wrapper",
    "validate",
]
