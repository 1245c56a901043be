"""Export run: a tirl ``.ckpt`` (a file, or a ``hardware=fsdp`` run's sharded directory, read in this one process)
→ a Hugging Face directory (weights, config, tokenizer).

    python src/export.py ckpt=logs/<task>/runs/<run>/checkpoints/last.ckpt out=exported/ [merge_lora=false]

The module is rebuilt with ``PolicyModule.load_from_checkpoint`` (the run's saved config, the checkpoint's
weights) and written by ``PolicyModule.export_hf``: a LoRA run's adapter merged in by default, or the adapter
alone (``merge_lora=false``), which ``init_from=<dir>`` and peft's ``AutoPeftModelForCausalLM`` load onto its base.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tirl.config import ConfigError
from tirl.models.sharded_checkpoint import (
    NOT_A_CHECKPOINT,
    is_checkpoint_path,
    looks_sharded,
    sharded_checkpoint_problem,
)

log = logging.getLogger(__name__)

EXPORT_KEYS = ("ckpt", "out", "merge_lora")


def check_args(argv: Sequence[str] | None = None) -> None:
    """Raise ConfigError for a command-line key export.yaml does not have (``ckt=…``, ``+merge=…``)."""
    import difflib

    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key in EXPORT_KEYS:
            continue
        close = difflib.get_close_matches(key, EXPORT_KEYS, n=1, cutoff=0.4)
        hint = f" did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown export key '{key}';{hint} Valid keys: {', '.join(EXPORT_KEYS)}.")


def run(cfg: DictConfig) -> str:
    """Write ``cfg.out`` from ``cfg.ckpt``; return the directory. Raises ConfigError for a user's mistake."""
    for key, example in (("ckpt", "logs/<task>/runs/<run>/checkpoints/last.ckpt"), ("out", "exported/my_model")):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ConfigError(f"Config value '{key}' is required; set it on the command line, e.g. {key}={example}.")
    ckpt = Path(str(cfg.ckpt)).expanduser()
    if looks_sharded(ckpt):   # a hardware=fsdp run's checkpoint directory, consolidated on this one process
        problem = sharded_checkpoint_problem(ckpt)
        if problem:
            raise ConfigError(f"ckpt: {problem}")
    elif not is_checkpoint_path(ckpt):   # before the seconds of importing torch and Lightning
        raise ConfigError(f"ckpt='{cfg.ckpt}' {NOT_A_CHECKPOINT}; pass the path of a tirl .ckpt file (or a sharded "
                          f"checkpoint's .ckpt/ directory), e.g. ckpt=logs/<task>/runs/<run>/checkpoints/last.ckpt.")
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out='{cfg.out}' already exists and is not an empty directory; pick a new directory "
                          f"(files left from an earlier export would be mixed with this one).")
    from tirl.models.load import ModelNotFoundError
    from tirl.modules.policy import PolicyModule

    try:
        module = PolicyModule.load_from_checkpoint(str(cfg.ckpt))
        module.export_hf(str(out), merge_lora=bool(cfg.merge_lora))
    except (ModelNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if (out / "adapter_config.json").exists():
        kind = "LoRA adapter alone"
    else:
        kind = "full weights, LoRA adapter merged in" if module.model_cfg.lora.enabled else "full weights"
    log.info("Exported %s to %s (%s).", cfg.ckpt, out, kind)
    return str(out)
