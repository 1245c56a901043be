"""The tiny model: Qwen3 architecture sized for 2 CPU cores, with the tokenizer tirl ships.

It is a checkpoint like any other: ``save_pretrained`` writes it and ``load_policy(path)`` reads it. The name
``tiny`` builds a freshly initialised one (seeded) from the shipped tokenizer; ``tiny-warm`` loads the small
SFT-warmed checkpoint shipped in ``tirl/assets/tiny_warm`` (made by ``scripts/make_tiny_warm.py``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

TINY_VOCAB_SIZE = 1024
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
)

ASSETS = files("tirl") / "assets"

# Qwen3's published chat template (Qwen/Qwen3-8B tokenizer_config.json), byte for byte: both tiny tokenizers carry
# it, so the tiny model is prompted exactly as a Qwen3 checkpoint is (tools, reasoning dropped before the last user
# query, consecutive tool results grouped in one user turn).
CHAT_TEMPLATE = (ASSETS / "qwen3_chat_template.jinja").read_text(encoding="utf-8")


def tiny_tokenizer_dir() -> Path:
    return Path(str(ASSETS / "tiny"))


def tiny_warm_dir() -> Path:
    return Path(str(ASSETS / "tiny_warm"))


def tiny_config(**overrides) -> Qwen3Config:
    """~0.92 M parameters: 4 layers, hidden 128, vocab 1024, tied embeddings."""
    kw = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,  # <|im_end|>
        pad_token_id=0,  # <|endoftext|>
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_tokenizer_dir()))
    tok.padding_side = "left"
    return tok


def build_tiny(seed: int = 0, **config_overrides) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Qwen3 and the shipped tokenizer (same seed → same weights)."""
    tok = load_tiny_tokenizer()
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 and tok.pad_token_id == 0, "shipped tokenizer changed"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(tiny_config(**config_overrides))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# Larger models of the same family for benchmarks (random init, the shipped tokenizer): one builder for every
# benchmark that needs "a real-sized small model" (rollout speed, packing), so their figures refer to one model.
BENCH_MODELS = {
    "tiny": {},                                                                          # ~0.9 M parameters
    "bench-40m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,    # ~38 M parameters
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64),
}


def build_bench_model(name: str = "bench-40m", seed: int = 0,
                      vocab_size: int | None = None) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """A benchmark model from ``BENCH_MODELS`` (Qwen3 architecture, tiny tokenizer), seeded. ``vocab_size``
    (default the tokenizer's 1,024) widens the embedding and lm_head to a real model's (e.g. 32,768 or Qwen's
    151,936) for benchmarks that feed token ids directly; ids beyond the tokenizer's 1,024 have no text."""
    if name not in BENCH_MODELS:
        raise ValueError(f"benchmark model '{name}' is not one of {sorted(BENCH_MODELS)}.")
    if vocab_size is not None and vocab_size < TINY_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {TINY_VOCAB_SIZE} tokens; pass at least that.")
    extra = {"vocab_size": vocab_size} if vocab_size is not None else {}
    return build_tiny(seed, **{**BENCH_MODELS[name], **extra})

