"""Where each value of a composed config came from: which file (or the command line) set it, over which others.

Hydra merges a run's config from its defaults list — train.yaml, each group's schema and option, ``scale/``,
``experiment/``, ``debug/`` — then the command line; the last source to set a key wins, silently. This replays that
list (the same one ``--info defaults`` shows) source by source and records, for every key, the chain of sources that
set it with the value each wrote. A run logs the values one file set over another's at start and keeps the whole
record in ``<output_dir>/.hydra/provenance.yaml``; ``python src/train.py <overrides> --provenance`` prints it and exits.

Reading the defaults list uses Hydra's config loader internals (hydra-core 1.3); tests/test_configs.py checks the
chains against the composed config, so a Hydra release that changes them fails there, not in a run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

SCHEMA = "schema"            # a group's typed defaults (tirl/config/schema.py), the base every value is set over
COMMAND_LINE = "command line"
FLAG = "--provenance"

# key (dotted) → [(source, value as the source wrote it)], in the order applied: the last entry is the value used
Chains = dict[str, list[tuple[str, Any]]]


@contextmanager
def _config_loader(config_dir: Path) -> Iterator[Any]:
    """Hydra's config loader: the running app's (inside ``@hydra.main`` or ``initialize``), else one made here."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            yield GlobalHydra.instance().config_loader()
    finally:
        GlobalHydra.instance().clear()


def _source_name(config_path: str) -> str:
    return SCHEMA if config_path.rsplit("/", 1)[-1] == "_schema" else f"{config_path}.yaml"


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value as written) for every value a loaded config sets; interpolations stay strings."""
    if isinstance(node, DictConfig):
        if node._is_none():
            yield prefix, None
            return
        for key in node.keys():
            if key == "defaults":
                continue
            child = node._get_node(key)
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
                yield from _leaves(child, dotted)
            elif isinstance(child, ListConfig) and not child._is_none():
                yield dotted, OmegaConf.to_container(child, resolve=False)
            else:
                yield dotted, child._value()
    elif prefix:
        yield prefix, node


def provenance(config_name: str, overrides: Sequence[str] = (), config_dir: Path | None = None) -> Chains:
    """Every key of ``config_name`` composed with ``overrides`` (as on the command line, one job's values), with
    the chain of sources that set it. Keys under ``hydra`` are left out."""
    from hydra._internal.defaults_list import create_defaults_list

    if config_dir is None:
        from tirl.config import CONFIG_DIR

        config_dir = CONFIG_DIR
    chains: Chains = {}
    with _config_loader(config_dir) as loader:
        parsed, repo = loader._parse_overrides_and_create_caching_repo(config_name, list(overrides))
        defaults = create_defaults_list(repo=repo, config_name=config_name, overrides_list=parsed,
                                        prepend_hydra=False, skip_missing=False)
        for default in defaults.defaults:
            path = default.config_path
            if path is None or path.startswith("hydra/") or default.package == "hydra":
                continue
            loaded = loader._load_single_config(default=default, repo=repo).config
            source = _source_name(path)
            for key, value in _leaves(loaded):
                if key.split(".", 1)[0] == "hydra" or (value == "???" and key in chains):
                    continue   # OmegaConf merges a missing value (???) over a set one as no change
                chains.setdefault(key, []).append((source, value))
        for override in parsed:   # key=value ones; group choices (method=thor) are in the defaults list above
            key = override.key_or_group
            if repo.group_exists(key) or key.split(".", 1)[0] == "hydra" or override.is_sweep_override():
                continue
            if override.is_delete():
                for sub in [k for k in chains if k == key or k.startswith(key + ".")]:
                    del chains[sub]
                continue
            value = override.value()
            leaves = _leaves(OmegaConf.create(value), key) if isinstance(value, dict) else [(key, value)]
            for sub, leaf in leaves:
                chains.setdefault(sub, []).append((COMMAND_LINE, leaf))
    return chains


def overridden(chains: Chains) -> Chains:
    """The keys whose value a source changed from the one an earlier source gave, leaving out a group's own file
    filling in its schema's default (``method/thor.yaml`` setting ``method.group_size``): what a reader of the chosen
    group files alone would not expect — ``scale/``, ``experiment/``, ``debug/``, the command line, a base preset."""
    out = {}
    for key, chain in chains.items():
        if len(chain) < 2 or chain[-1][1] == chain[-2][1]:
            continue
        group = key.split(".", 1)[0]
        if len(chain) == 2 and chain[0][0] == SCHEMA and chain[1][0].startswith(f"{group}/"):
            continue
        out[key] = chain
    return out


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def format_chains(chains: Chains) -> list[str]:
    """One line per key: ``method.lr: 0.0001  <- scale/tiny.yaml (over method/grpo.yaml: 1.0e-06)``."""
    lines = []
    width = max((len(k) for k in chains), default=0)
    for key, chain in chains.items():
        source, value = chain[-1]
        earlier = [f"{s}: {_value_text(v)}" for s, v in chain[:-1] if s != SCHEMA or len(chain) == 2]
        over = f" (over {', '.join(reversed(earlier))})" if earlier else ""
        lines.append(f"{key:<{width}}  {_value_text(value)}  <- {source}{over}")
    return lines


def as_record(chains: Chains) -> dict[str, Any]:
    """The yaml record: each key set by a file or the command line → its value, source and the values it replaced."""
    record: dict[str, Any] = {}
    for key, chain in chains.items():
        source, value = chain[-1]
        if source == SCHEMA:
            continue
        entry: dict[str, Any] = {"value": value, "from": source}
        earlier = {s: v for s, v in chain[:-1] if s != SCHEMA}
        if earlier:
            entry["over"] = earlier
        record[key] = entry
    return record


def record_provenance(cfg: DictConfig, output_dir: str | None) -> None:
    """Log the values that one config file set over another's and write the whole record to
    ``<output_dir>/.hydra/provenance.yaml``. Needs Hydra's runtime config (``@hydra.main`` or ``runnable``);
    without it, or should the defaults list not be readable, it says so and the run goes on."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    try:
        chains = provenance(hydra_cfg.job.config_name, list(hydra_cfg.overrides.task))
    except Exception as err:  # a diagnostic: never the reason a run fails
        log.warning("Config provenance not recorded (%s: %s).", type(err).__name__, err)
        return
    changed = overridden(chains)
    if changed:
        log.info("Config values set over another file's (all sources: .hydra/provenance.yaml):\n  %s",
                 "\n  ".join(format_chains(changed)))
    if output_dir:
        path = Path(output_dir) / ".hydra" / "provenance.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = ("# Where each config value comes from: the source that set it last ('from') and the values it "
                  "replaced ('over'),\n# in the order Hydra merged them (python src/train.py ... --provenance prints "
                  "this). Keys left at the schema's default are not listed.\n")
        path.write_text(header + yaml.safe_dump(as_record(chains), sort_keys=False, width=120))


def exit_on_provenance_flag(config_name: str, argv: list[str] | None = None) -> None:
    """``--provenance`` among the arguments: print where every value of the composed config comes from and exit 0
    (Hydra has no hook for a flag of its own, so the entry point looks for it before Hydra parses argv)."""
    args = sys.argv[1:] if argv is None else argv
    if FLAG not in args:
        return
    from tirl.config import exit_on_config_error

    overrides = [a for a in args if a != FLAG and not a.startswith("-")]
    with exit_on_config_error():
        chains = provenance(config_name, overrides)
    command = " ".join([f"{config_name}.yaml", *overrides])
    print(f"# {command}: values one source set over another's\n" + "\n".join(format_chains(overridden(chains)))
          + "\n\n# every value, the source that set it last, and the values it replaced\n"
          + "\n".join(format_chains(chains)))
    raise SystemExit(0)
