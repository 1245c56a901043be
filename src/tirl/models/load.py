"""Load a policy and its tokenizer from a Hugging Face hub id or a local directory.

``tiny`` and ``tiny-warm`` name the project's own tiny model (see ``tirl.models.tiny``); anything else goes
through ``from_pretrained`` unchanged, so the same config runs a 0.92 M-parameter model on a laptop and
Qwen3-14B on a GPU node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tirl.errors import UserError
from tirl.models.tiny import build_tiny, load_tiny_tokenizer, tiny_warm_dir

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


def _not_found(name: str, err: Exception) -> ModelNotFoundError:
    if _looks_local(name):
        msg = f"Model path '{name}' does not exist or is not a Hugging Face checkpoint directory; check model.name_or_path."
    else:
        msg = (
            f"Model '{name}' is not in the local Hugging Face cache and the Hub could not be reached ({type(err).__name__}); "
            f"download it where there is network (`hf download {name}`) and set model.name_or_path to that directory."
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


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    lora: LoraSpec | dict | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """The trainable policy, optionally wrapped with a LoRA adapter (peft)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype='{dtype}' is not one of {sorted(DTYPES)}.")
    if name_or_path == "tiny":
        model, _ = build_tiny(seed)
        model = model.to(DTYPES[dtype]) if dtype != "auto" else model
    else:
        path = str(tiny_warm_dir()) if name_or_path == "tiny-warm" else name_or_path
        if name_or_path == "tiny-warm" and not (tiny_warm_dir() / "config.json").exists():
            raise ModelNotFoundError(
                "The warm tiny checkpoint is missing from tirl/assets/tiny_warm; build it with `python scripts/make_tiny_warm.py`."
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(Path(path).expanduser()) if _looks_local(path) else path,
                dtype=DTYPES[dtype],
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        except OSError as err:
            raise _not_found(name_or_path, err) from err
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        model = apply_lora(model, lora if isinstance(lora, LoraSpec) else LoraSpec(**lora))
    return model


def apply_lora(model: PreTrainedModel, spec: LoraSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
