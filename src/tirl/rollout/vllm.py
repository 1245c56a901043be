"""vLLM rollouts: a colocated engine on the trainer's own GPU, with the policy's weights pushed in lazily.

Same contract as ``HFBackend.generate``: token ids in, one ``Generation`` per prompt out, with the log-prob of
every sampled token at the rollout temperature, a stop reason ("eos" | "tool" | "length") and, when a
```python block closed, the index of the token where its fence starts.

How it stays in sync without hooks in the LightningModule: ``GRPOModule`` asks for a backend every step
(``VLLMBackend.colocated``), which returns a wrapper around one engine cached per policy. Each ``generate``
compares the policy's *parameter version* — the sum of the autograd version counters of its trainable tensors,
which every in-place optimiser update bumps — with the version last pushed; when it moved, the weights (the
full state dict, or the base with the LoRA adapter merged in) are loaded into the engine first. With sleep mode
the engine wakes its weights, loads, wakes its KV cache, generates, and sleeps again, so the trainer gets the
GPU memory back for the update.

Entropies: vLLM returns only the top-k log-probs of each step (``LOGPROBS_K``), so ``Generation.entropies`` holds
a lower bound of the true entropy: the entropy of the distribution whose top-k tokens keep their probabilities
and whose remaining mass is lumped into one token. It is exact when the tail is a single token and within
``tail_mass·log(V)`` of the truth otherwise; D-CORE's shaping (``min(α·H, δ)``) caps it anyway.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tirl.config.schema import RolloutConfig
from tirl.errors import UserError
from tirl.rollout.backend import fence_token_index
from tirl.rollout.types import Generation, SamplingParams, prompt_budgets
from tirl.tools.text_format import FENCE_CLOSE, code_block_end

LOGPROBS_K = 20           # top-k log-probs per step that vLLM returns (for the entropy estimate)
MAX_FENCE_RESUMES = 8     # stops at fences that do not close a ```python block, resumed per sample


class VLLMUnavailableError(UserError, RuntimeError):
    """rollout.backend=vllm on a machine that cannot run it."""


def check_vllm_available(what: str = "rollout=vllm", instead: str = "rollout=hf (the default)") -> None:
    """Raise one sentence when no vLLM engine can run here (no CUDA device, or no vllm package).

    The one place that decides whether vLLM can run: training and evaluation (``rollout=vllm``) and the data
    pipelines (``backend@backends.<role>=vllm``) call it before loading any model. ``what`` names the setting that
    asked for vLLM and ``instead`` the one to use here. Widen it here when vLLM gains other devices (CPU builds).
    """
    import torch

    if not torch.cuda.is_available():
        raise VLLMUnavailableError(
            f"{what} needs a CUDA GPU but none is available here; use {instead} on this machine."
        )
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise VLLMUnavailableError(
            f"{what} needs the vllm package ({e}); install it with `pip install -e '.[vllm]'` or use {instead}."
        ) from None


# ---------------------------------------------------------------------------------------------- pure functions
def entropy_from_top_logprobs(top_logprobs: list[float]) -> float:
    """Entropy lower bound from the top-k log-probs of one step (the tail mass counted as one token)."""
    probs = [math.exp(lp) for lp in top_logprobs]
    h = -sum(p * lp for p, lp in zip(probs, top_logprobs) if p > 0)
    tail = 1.0 - sum(probs)
    if tail > 1e-12:
        h -= tail * math.log(tail)
    return h


def map_stop_reason(finish_reason: str | None, stop_reason: Any, text: str, stop_at_code: bool) -> str:
    """vLLM's (finish_reason, stop_reason) → "eos" | "tool" | "length" | "resume".

    vLLM reports ``finish_reason="length"`` at the token budget and ``"stop"`` otherwise, with ``stop_reason``
    None (EOS), an int (a stop token id) or the stop string that matched. The closing-fence stop string also
    matches an *opening* fence or a non-python block, so a string stop counts as "tool" only when the text
    really closed a ```python block; otherwise it is "resume": generation continues from where it stopped.
    """
    if finish_reason == "length":
        return "length"
    if isinstance(stop_reason, str):
        if stop_at_code and code_block_end(text) is not None:
            return "tool"
        return "resume"
    return "eos"


def step_logprobs(step: dict, token_id: int) -> tuple[float, float]:
    """(log p of the sampled token, entropy estimate) from one step of vLLM's ``logprobs`` (token id → Logprob)."""
    lps = {tid: (lp.logprob if hasattr(lp, "logprob") else float(lp)) for tid, lp in step.items()}
    return lps[token_id], entropy_from_top_logprobs([v for v in lps.values() if v > -math.inf])


def to_vllm_sampling_kwargs(params: SamplingParams, max_tokens: int, stop_token_ids: list[int]) -> dict:
    """tirl's SamplingParams as keyword arguments of ``vllm.SamplingParams``."""
    kw = dict(
        n=1, max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1, logprobs=LOGPROBS_K, stop_token_ids=list(stop_token_ids),
        skip_special_tokens=False, spaces_between_special_tokens=False,
    )
    if params.stop_at_code:
        # a closing fence is "\n```"; vLLM checks stop strings on the detokenised text and keeps them in the output
        kw.update(stop=[FENCE_CLOSE], include_stop_str_in_output=True)
    return kw


# ---------------------------------------------------------------------------------------------- weights
def parameter_version(policy) -> int:
    """Sum of the version counters of the trainable tensors: moves whenever an optimiser updates them in place."""
    return sum(p._version for p in policy.parameters() if p.requires_grad)


def merged_lora_state(policy) -> dict:
    """HF-named weights of a peft LoRA model with the adapter merged in (the base tensors are left untouched).

    W' = W + (α/r)·B·A for every adapted linear layer; keys lose peft's ``base_model.model.`` prefix and its
    ``.base_layer`` wrapper so they match the base checkpoint's names, which is what vLLM's loader expects.
    """
    out = {}
    for name, module in policy.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            key = _hf_name(name) + ".weight"
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            out[key] = (module.base_layer.weight + delta).detach()
    for name, tensor in policy.state_dict().items():
        if "lora_" in name:
            continue
        key = _hf_name(name.replace(".base_layer", ""))
        out.setdefault(key, tensor.detach())
    return out


def _hf_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


def policy_weights(policy) -> dict:
    """The weights vLLM should serve: merged LoRA, or the full state dict (FSDP2 DTensors gathered)."""
    from tirl.models.reference import is_lora

    state = merged_lora_state(policy) if is_lora(policy) else {k: v.detach() for k, v in policy.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}


def _load_weights_on_worker(worker, weights: list) -> None:
    """Runs inside vLLM's worker (in this process: V1 multiprocessing is off for the colocated engine)."""
    worker.model_runner.model.load_weights(weights=weights)


# ---------------------------------------------------------------------------------------------- the engine
@dataclass
class EngineState:
    llm: Any
    pushed_version: int | None = None
    asleep: bool = False


_ENGINES: dict[int, EngineState] = {}


def build_engine(policy, tokenizer, cfg: RolloutConfig, dtype: str = "bfloat16") -> Any:
    """A vLLM ``LLM`` with the policy's architecture and dummy weights (the real ones arrive with the first push)."""
    # the engine runs inside this process, so weight pushes are plain tensor handoffs, not IPC
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from tirl.models.reference import is_lora

    base = policy.get_base_model() if is_lora(policy) else policy
    model_dir = tempfile.mkdtemp(prefix="tirl_vllm_")
    base.config.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return LLM(
        model=model_dir, tokenizer=model_dir, load_format="dummy", dtype=dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size,
        enable_sleep_mode=cfg.enable_sleep_mode, max_model_len=cfg.max_prompt_tokens + cfg.max_total_tokens + 64,
        enable_prefix_caching=True, logprobs_mode="processed_logprobs",   # log-probs at the sampling temperature
        seed=0,
    )


class VLLMBackend:
    """``GenerationBackend`` over a colocated vLLM engine."""

    def __init__(self, engine: EngineState, policy, tokenizer, cfg: RolloutConfig):
        self.engine, self.policy, self.tokenizer, self.cfg = engine, policy, tokenizer, cfg
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                 tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        self.stop_token_ids = sorted(t for t in stops if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id)

    @classmethod
    def colocated(cls, policy, tokenizer, cfg: RolloutConfig, dtype: str = "bfloat16") -> VLLMBackend:
        """The backend for ``policy``: one engine per policy, built on first use and reused every step."""
        check_vllm_available()
        key = id(policy)
        if key not in _ENGINES:
            _ENGINES[key] = EngineState(build_engine(policy, tokenizer, cfg, dtype))
            weakref.finalize(policy, _ENGINES.pop, key, None)
        return cls(_ENGINES[key], policy, tokenizer, cfg)

    # -------------------------------------------------------------- sync and memory
    def sync_weights(self) -> None:
        """Wake the engine and push the policy's weights if they changed since the last push."""
        e = self.engine
        version = parameter_version(self.policy)
        if e.asleep:
            e.llm.wake_up(tags=["weights"])
        if version != e.pushed_version:
            weights = list(policy_weights(self.policy).items())
            e.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
            e.llm.reset_prefix_cache()       # cached KV of the old weights is stale
            e.pushed_version = version
        if e.asleep:
            e.llm.wake_up(tags=["kv_cache"])
            e.asleep = False

    def sleep(self) -> None:
        if self.cfg.enable_sleep_mode and not self.engine.asleep:
            self.engine.llm.sleep(level=1)   # weights to CPU, KV cache freed: the trainer gets the memory
            self.engine.asleep = True

    # -------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_new_tokens: Sequence[int] | None = None) -> list[Generation]:
        """See ``GenerationBackend.generate``: one vLLM SamplingParams per prompt, each with its own budget."""
        budgets = prompt_budgets(len(prompts), params, max_new_tokens)
        self.sync_weights()
        try:
            return self._generate(prompts, params, budgets)
        finally:
            self.sleep()

    def _generate(self, prompts: list[list[int]], params: SamplingParams, budgets: list[int]) -> list[Generation]:
        from vllm import SamplingParams as VSamplingParams

        gens = [Generation([], [], [], "length") for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(MAX_FENCE_RESUMES + 1):
            if not active:
                break
            requests, sampling = [], []
            for i in active:
                budget = budgets[i] - len(gens[i].ids)
                requests.append({"prompt_token_ids": prompts[i] + gens[i].ids})
                sampling.append(VSamplingParams(**to_vllm_sampling_kwargs(params, budget, self.stop_token_ids)))
            outputs = self.engine.llm.generate(requests, sampling, use_tqdm=False)
            still = []
            for i, out in zip(active, outputs):
                c = out.outputs[0]
                g = gens[i]
                for tok, step in zip(c.token_ids, c.logprobs or []):
                    lp, h = step_logprobs(step, tok)
                    g.ids.append(tok)
                    g.logprobs.append(lp)
                    g.entropies.append(h)
                text = self.tokenizer.decode(g.ids)
                reason = map_stop_reason(c.finish_reason, c.stop_reason, text, params.stop_at_code)
                if reason == "resume" and len(g.ids) < budgets[i]:
                    still.append(i)
                    continue
                g.stop_reason = "length" if reason == "resume" else reason
                if reason == "tool":
                    g.code_start = fence_token_index(g.ids, self.tokenizer.decode)
            active = still
        return gens
