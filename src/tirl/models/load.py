"""Load a policy and its tokenizer from a Hugging Face hub id or a local directory, optionally starting from
``init_from`` weights, and optionally with a fresh LoRA adapter on top.

``tiny`` and ``tiny-warm`` name the project's own tiny model (see ``tirl.models.tiny``); anything else goes
through ``from_pretrained`` unchanged, so the same config runs a 0.92 M-parameter model on a laptop and
Qwen3-14B on a GPU node.

Starting weights (``init_from``), the one place every caller (training, resuming, evaluation, export) reads them:
- an HF model directory: loaded as the model;
- a tirl Lightning ``.ckpt``: its ``policy.*`` weights go onto ``model.name_or_path``;
- an adapter-only directory (``adapter_config.json``, what ``export merge_lora=false`` writes): the adapter goes onto
  ``model.name_or_path``.
A LoRA adapter found in a ``.ckpt`` or an adapter directory is merged into the base weights first, so the result
is always a plain model equal to the end of the earlier stage. A LoRA run then adds a *fresh* adapter on top, and
its KL reference (the adapter switched off) is that starting model, as with a full fine-tune's frozen copy.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tirl.errors import UserError
from tirl.models.tiny import build_tiny, load_tiny_tokenizer, tiny_warm_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelNotFoundError(UserError, RuntimeError):
    """The model id/path could not be loaded (missing directory, no network, typo)."""


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _not_found(name: str, err: Exception, key: str = "model.name_or_path") -> ModelNotFoundError:
    if _looks_local(name):
        msg = f"Model path '{name}' does not exist or is not a Hugging Face checkpoint directory; check {key}."
    else:
        msg = (
            f"Model '{name}' is not in the local Hugging Face cache and the Hub could not be reached ({type(err).__name__}); "
            f"download it where there is network (`hf download {name}`) and set {key} to that directory."
        )
    return ModelNotFoundError(msg)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (generation) and a pad token."""
    if name_or_path in ("tiny", "tiny-warm"):
        return load_tiny_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()) if _looks_local(name_or_path) else name_or_path,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _not_found(name_or_path, err) from err
    if len(tok) <= 1 or not tok.encode("a", add_special_tokens=False):
        raise ModelNotFoundError(
            f"'{name_or_path}' has no usable tokenizer files (tokenizer.json / vocab); save the tokenizer next to the weights."
        )
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def init_kind(init_from: str) -> str:
    """What ``init_from`` names: ``"ckpt"`` (a tirl Lightning checkpoint: a file, or the directory of a sharded one,
    see ``tirl.models.sharded_checkpoint``), ``"adapter"`` (a directory holding a peft adapter alone) or ``"hf"``
    (an HF model directory). Raises ModelNotFoundError when it does not exist."""
    from tirl.models.sharded_checkpoint import looks_sharded

    path = Path(init_from).expanduser()
    if path.is_file() or looks_sharded(path):
        return "ckpt"
    if path.is_dir():
        return "adapter" if (path / "adapter_config.json").is_file() else "hf"
    if not _looks_local(init_from) and not init_from.endswith(".ckpt"):
        return "hf"   # a hub id
    raise ModelNotFoundError(
        f"init_from='{init_from}' does not exist; point it at a tirl .ckpt (file or sharded directory), an HF model directory or an adapter "
        f"directory written by `python src/export.py merge_lora=false`."
    )


def read_checkpoint(ckpt_path: str) -> tuple[dict[str, torch.Tensor], LoraSpec | None, dict]:
    """The policy weights of a tirl Lightning checkpoint (``policy.`` prefix removed; the reference copy and the
    optimizer state left out), the LoRA spec they were trained with (None for a full fine-tune), and the run's
    hyper-parameters (``method``, ``model``, ``init_from``, … as plain dicts). ``ckpt_path``: a ``.ckpt`` file, or
    the directory of a sharded checkpoint (``hardware=fsdp``), consolidated here on one process.

    Raises ModelNotFoundError for a missing path or one that is not a (complete) tirl checkpoint."""
    from tirl.models.sharded_checkpoint import NOT_A_CHECKPOINT, looks_sharded, read_sharded_checkpoint

    path = Path(ckpt_path).expanduser()
    if path.is_dir() and looks_sharded(path):
        try:
            weights, ckpt = read_sharded_checkpoint(path)
        except ValueError as err:
            raise ModelNotFoundError(str(err)) from None
    elif not path.is_file():
        raise ModelNotFoundError(f"Checkpoint '{ckpt_path}' {NOT_A_CHECKPOINT}; pass a tirl .ckpt file or sharded checkpoint "
                                 f"directory (e.g. logs/<task>/runs/<run>/checkpoints/last.ckpt).")
    else:
        try:   # tirl saves plain containers only, so no pickled code from a downloaded file ever runs
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:   # a truncated file, an HF .bin, a pickle of something else
            raise ModelNotFoundError(f"'{ckpt_path}' could not be read as a Lightning checkpoint "
                                     f"({type(err).__name__}); pass a .ckpt written by a tirl run.") from None
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
        weights = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
    if not weights:
        raise ModelNotFoundError(f"'{ckpt_path}' holds no policy weights; pass a .ckpt written by a tirl run.")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    spec = None
    if any(".lora_A." in k for k in weights):
        lora = dict((hparams.get("model") or {}).get("lora") or {})
        if not lora:
            raise ModelNotFoundError(f"'{ckpt_path}' holds LoRA weights but not the LoRA settings they were trained "
                                     f"with (hyper_parameters.model.lora); pass a .ckpt written by a tirl run.")
        spec = LoraSpec(r=lora["r"], alpha=lora["alpha"], target_modules=list(lora["target_modules"]))
    return weights, spec, hparams


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str, base: str) -> None:
    """Load a checkpoint's ``weights`` into ``model`` (built from ``base``) strictly; a mismatch is one sentence."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ModelNotFoundError(f"The weights in '{source}' do not fit the model '{base}' ({first[:160]}); set "
                                 f"model.name_or_path to the model that run trained.") from None


def _trainable(model: PreTrainedModel) -> PreTrainedModel:
    """A merged adapter's model with every weight trainable again: peft froze the base when it wrapped it, and a
    full fine-tune from a LoRA run's weights would otherwise find nothing to train."""
    model.requires_grad_(True)
    return model


def load_start_weights(model: PreTrainedModel, init_from: str, base: str) -> PreTrainedModel:
    """``model`` (plain, built from ``base``) with the weights of a ``.ckpt`` or an adapter directory, any LoRA
    adapter merged in: a plain model equal to the end of the run that wrote ``init_from``."""
    kind = init_kind(init_from)
    if kind == "ckpt":
        weights, spec, _ = read_checkpoint(init_from)
        if spec is None:
            load_weights(model, weights, init_from, base)
            return model
        peft_model = apply_lora(model, spec)
        load_weights(peft_model, weights, init_from, base)
        return _trainable(peft_model.merge_and_unload())
    if kind == "adapter":
        from peft import PeftModel

        wrote = json.loads((Path(init_from).expanduser() / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if wrote and wrote != base:
            log.warning("The adapter in '%s' was trained on '%s'; it goes onto "
                                                "model.name_or_path='%s'.", init_from, wrote, base)
        try:
            with quiet_peft_wrap():
                return _trainable(PeftModel.from_pretrained(model, str(Path(init_from).expanduser())).merge_and_unload())
        except RuntimeError as err:
            raise ModelNotFoundError(f"The adapter in '{init_from}' does not fit the model '{base}' "
                                     f"({str(err).splitlines()[-1][:160]}); set model.name_or_path to its base model.") from None
    return model


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    lora: LoraSpec | dict | None = None,
    seed: int = 0,
    init_from: str | None = None,
) -> PreTrainedModel:
    """The trainable policy: ``name_or_path`` (or the HF directory ``init_from``), with the starting weights of
    ``init_from`` (see the module docstring), then optionally wrapped with a fresh LoRA adapter (peft)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype='{dtype}' is not one of {sorted(DTYPES)}.")
    key = "model.name_or_path"
    if init_from and init_kind(init_from) == "hf":
        name_or_path, init_from, key = str(init_from), None, "init_from"
    model = _load_model(name_or_path, dtype, attn_implementation, trust_remote_code, seed, key)
    if init_from:
        model = load_start_weights(model, init_from, name_or_path)
    if gradient_checkpointing:   # transformers 5.2x renamed it (the old name warns); the vLLM venv's has only the old
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        model = apply_lora(model, lora if isinstance(lora, LoraSpec) else LoraSpec(**lora))
    return model


def _load_model(name_or_path: str, dtype: str, attn_implementation: str | None, trust_remote_code: bool,
                seed: int, key: str) -> PreTrainedModel:
    if name_or_path == "tiny":
        model, _ = build_tiny(seed)
        model = model.to(DTYPES[dtype]) if dtype != "auto" else model
    else:
        path = str(tiny_warm_dir()) if name_or_path == "tiny-warm" else name_or_path
        if name_or_path == "tiny-warm" and not (tiny_warm_dir() / "config.json").exists():
            raise ModelNotFoundError(
                "The warm tiny checkpoint is missing from tirl/assets/tiny_warm; build it with `python scripts/make_tiny_warm.py`."
            )
        if _looks_local(path) and Path(path).expanduser().is_dir() and not (Path(path).expanduser() / "config.json").exists():
            raise _not_found(name_or_path, FileNotFoundError("config.json"), key)   # a run directory, an empty one
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(Path(path).expanduser()) if _looks_local(path) else path,
                dtype=DTYPES[dtype],
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        except OSError as err:
            raise _not_found(name_or_path, err, key) from err
    return model


def apply_lora(model: PreTrainedModel, spec: LoraSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules), task_type="CAUSAL_LM",
    )
    with quiet_peft_wrap():
        return get_peft_model(model, config)


@contextmanager
def quiet_peft_wrap() -> Iterator[None]:
    """Wrapping a model in peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning a
    user cannot act on); that one warning is silenced while inside, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def disable_dropout(model: nn.Module) -> dict[str, float]:
    """Set every dropout probability in ``model`` to 0 — ``nn.Dropout`` modules (LoRA's ``lora_dropout`` too), the
    float ``*dropout*`` attributes attention layers pass to their kernels (``attention_dropout``), and the config's
    ``*dropout*`` values — so its train-mode forward equals its eval-mode one. Returns what was non-zero, by name."""
    was: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p:
                was[name or "dropout"] = float(module.p)
            module.p = 0.0
            continue
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float) and not isinstance(value, bool):
                if value:
                    was[f"{name}.{attr}" if name else attr] = value
                setattr(module, attr, 0.0)
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
    for config in list(configs.values()):   # composite models keep their text model's config inside
        configs.update({id(v): v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")})
    for config in configs.values():
        for attr, value in list(vars(config).items()):
            if "dropout" in attr and isinstance(value, float) and not isinstance(value, bool):
                if value:
                    was[f"config.{attr}"] = value
                setattr(config, attr, 0.0)
    return was
