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

import atexit
import contextlib
import gc
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tirl.config.schema import RolloutConfig
from tirl.errors import UserError
from tirl.rollout.types import CLOSE_FENCE, OPEN_FENCE, Generation, SamplingParams, prompt_budgets

log = logging.getLogger(__name__)

LOGPROBS_K = 20           # top-k log-probs per step that vLLM returns (for the entropy estimate)
MAX_FENCE_RESUMES = 8     # stops at fences that do not close a ```python block, resumed per sample
GPU_ONLY_KNOBS = ("gpu_memory_utilization", "enable_sleep_mode", "tensor_parallel_size")


class VLLMUnavailableError(UserError, RuntimeError):
    """rollout.backend=vllm on a machine that cannot run it."""


def engine_device() -> str:
    """Where a vLLM engine runs on this machine: "cuda" when a CUDA GPU is visible, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_vllm_available(what: str = "rollout=vllm", instead: str = "rollout=hf") -> str:
    """The engine's device ("cuda" | "cpu"); one sentence (naming ``what`` needs it and ``instead``) when vllm is
    absent or built for hardware that is not here.

    The one place that decides whether vLLM can run: training and evaluation (``rollout=vllm``) and the data
    pipelines (``backend@backends.<role>=vllm``) call it before loading any model."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as e:
        raise VLLMUnavailableError(
            f"{what} needs the vllm package ({e}); install it with `pip install -e '.[vllm]'` on a GPU machine or "
            f"scripts/install_vllm_cpu.sh in its own venv on a CPU one (see README), or use {instead}."
        ) from None
    device = engine_device()
    built_for = getattr(current_platform, "device_type", "") or "an unknown device"
    if device == "cpu" and built_for != "cpu":
        raise VLLMUnavailableError(
            f"{what} found a vllm built for {built_for} but no CUDA GPU here; on a CPU install vllm-cpu with "
            f"scripts/install_vllm_cpu.sh in its own venv, or use {instead}."
        )
    return device


def platform_engine_kwargs(knobs: dict, device: str) -> tuple[dict, list[str]]:
    """Split engine keyword arguments into those the device honours and a note for each that it cannot.

    ``knobs`` holds vLLM ``LLM`` keyword arguments. On "cuda" all pass through. On "cpu" the GPU-only ones
    (``GPU_ONLY_KNOBS``) are dropped; a note is returned for each that asks for something a CPU cannot do
    (sleep mode on, tensor parallelism > 1, a memory fraction: the CPU KV cache is sized in GiB instead).
    A CPU engine runs eagerly unless ``enforce_eager`` says otherwise: vllm-cpu 0.32's default graph mode (dynamo
    tracing, eager backend) was 7x slower on the tiny model here (64 x 128 tokens: 3.2 s vs 0.44 s).
    """
    if device != "cpu":
        return dict(knobs), []
    kept = {k: v for k, v in knobs.items() if k not in GPU_ONLY_KNOBS}
    kept.setdefault("enforce_eager", True)
    notes = []
    if knobs.get("enable_sleep_mode"):
        notes.append("enable_sleep_mode=true (vLLM has no sleep mode on CPU)")
    if knobs.get("tensor_parallel_size", 1) not in (1, None):
        notes.append(f"tensor_parallel_size={knobs['tensor_parallel_size']} (the CPU engine here is one in-process worker)")
    if knobs.get("gpu_memory_utilization") is not None:
        notes.append(f"gpu_memory_utilization={knobs['gpu_memory_utilization']} (the CPU KV cache is sized in GiB)")
    return kept, notes


def engine_dtype(policy, device: str) -> str:
    """The engine's dtype: the policy's, except fp32 on a GPU → bfloat16 (mixed-precision master weights)."""
    import torch

    dt = next(policy.parameters()).dtype
    if dt == torch.float32 and device != "cpu":
        return "bfloat16"
    return str(dt).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- pure functions
def entropy_from_top_logprobs(top_logprobs: list[float]) -> float:
    """Entropy lower bound from the top-k log-probs of one step (the tail mass counted as one token)."""
    probs = [math.exp(lp) for lp in top_logprobs]
    h = -sum(p * lp for p, lp in zip(probs, top_logprobs) if p > 0)
    tail = 1.0 - sum(probs)
    if tail > 1e-12:
        h -= tail * math.log(tail)
    return h


def closes_python_block(text: str) -> bool:
    """True when ``text`` holds a ```python fence followed later by a closing fence (what HF's FenceWatcher sees)."""
    i = text.find(OPEN_FENCE)
    return i >= 0 and text.find(CLOSE_FENCE, i + len(OPEN_FENCE)) >= 0


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
        if stop_at_code and closes_python_block(text):
            return "tool"
        return "resume"
    return "eos"


def fence_token_index(ids: list[int], decode) -> int:
    """Index of the token in which the last ```python fence starts (as ``HFBackend._fence_token``)."""
    text = decode(ids)
    start = text.rfind(OPEN_FENCE)
    lo, hi = 0, len(ids)   # smallest k such that decode(ids[:k+1]) reaches past `start`
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid + 1])) > start:
            hi = mid
        else:
            lo = mid + 1
    return lo


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
        kw.update(stop=[CLOSE_FENCE], include_stop_str_in_output=True)
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


def _reload_weights_on_worker(worker, weights: list) -> None:
    """Runs inside vLLM's worker (in this process: V1 multiprocessing is off for the in-process engine).

    ``reload_weights`` copies checkpoint-format tensors into the engine's parameters and reruns the post-load
    processing (the CPU build repacks linear weights there); inference mode because a push made while autograd
    is recording (e.g. from validation) otherwise leaves inference tensors the next push cannot update in place.
    """
    import torch

    with torch.inference_mode():
        worker.reload_weights(weights_iterator=iter(weights))


# ---------------------------------------------------------------------------------------------- the engine
_OPEN: weakref.WeakSet = weakref.WeakSet()      # every engine open_engine started and close_engine has not closed


@contextlib.contextmanager
def _threads_kept():
    """Undo what vLLM's in-process CPU worker does to the whole process: it pins the OpenMP threads to its
    cores and replaces ``torch.set_num_threads`` by a no-op. Thread count, affinity and the function come back."""
    import torch

    set_threads, n = torch.set_num_threads, torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(n)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def open_engine(model: str, device: str, knobs: dict | None = None, cpu_kvcache_space_gb: int = 1,
                **engine_kwargs: Any) -> Any:
    """A vLLM ``LLM`` for ``model`` (a hub id or a checkpoint directory) running in this process on ``device``.

    ``knobs`` are the platform-dependent engine arguments (``platform_engine_kwargs`` decides which apply; one
    warning sentence lists those that cannot be); ``engine_kwargs`` go to ``LLM`` as they are. On a CPU the KV
    cache is ``cpu_kvcache_space_gb`` GiB. Close it with ``close_engine`` (also done at interpreter exit).
    """
    kept, notes = platform_engine_kwargs(knobs or {}, device)
    if notes:
        log.warning("rollout=vllm on CPU ignores %s.", ", ".join(notes))
    # in this process, so weight pushes are plain tensor handoffs, not IPC (and no stray engine process at exit)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if device == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kvcache_space_gb))
    from vllm import LLM

    with _threads_kept():
        llm = LLM(model=model, **kept, **engine_kwargs)
    _OPEN.add(llm)
    return llm


def close_engine(llm) -> None:
    """Shut an in-process engine down: its engine core (scheduler, executor, worker) and vLLM's process group.

    Without this an engine left to the garbage collector kept pytest from exiting (its gloo group and worker
    stay alive). Safe to call twice.
    """
    if llm is None or getattr(llm, "_tirl_closed", False):
        return
    llm._tirl_closed = True
    _OPEN.discard(llm)
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        with contextlib.suppress(Exception):
            core.shutdown()
    if not _OPEN:   # the process group is shared by every in-process engine: the last one out tears it down
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
    gc.collect()


def write_engine_model_dir(model, tokenizer, prefix: str = "tirl_vllm_", weights: bool = False) -> str:
    """A temporary checkpoint directory vLLM can start from: the model's config (and weights when asked) and the
    tokenizer. ``architectures`` is set from the model class: a model built in memory (``model=tiny``) has
    ``architectures=None``, from which vLLM builds a model without its LM head and every weight push fails."""
    import copy

    path = tempfile.mkdtemp(prefix=prefix)
    config = copy.deepcopy(model.config)
    if not config.architectures:
        config.architectures = [type(model).__name__]
    if weights:
        model.save_pretrained(path)          # writes the weights and its own config ...
    config.save_pretrained(path)             # ... which this one (with architectures) replaces
    tokenizer.save_pretrained(path)
    return path


@dataclass
class EngineState:
    llm: Any
    pushed_version: int | None = None
    asleep: bool = False
    device: str = "cuda"


_ENGINES: dict[int, EngineState] = {}


def build_engine(policy, tokenizer, cfg: RolloutConfig, dtype: str | None = None, device: str | None = None) -> Any:
    """A vLLM ``LLM`` with the policy's architecture and dummy weights (the real ones arrive with the first push)."""
    from tirl.models.reference import is_lora

    device = device or engine_device()
    base = policy.get_base_model() if is_lora(policy) else policy
    model_dir = write_engine_model_dir(base, tokenizer)
    try:
        return open_engine(
            model_dir, device,
            knobs=dict(gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size,
                       enable_sleep_mode=cfg.enable_sleep_mode),
            cpu_kvcache_space_gb=cfg.cpu_kvcache_space_gb,
            tokenizer=model_dir, load_format="dummy", dtype=dtype or engine_dtype(policy, device),
            max_model_len=cfg.max_prompt_tokens + cfg.max_total_tokens + 64,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs",   # log-probs at the sampling temperature
            seed=0,
        )
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)   # read once at start-up; weights come by push


def _close_policy_engine(key: int) -> None:
    state = _ENGINES.pop(key, None)
    if state is not None:
        close_engine(state.llm)


def close_all_engines() -> None:
    """Close every engine this process opened (registered with ``atexit``)."""
    for key in list(_ENGINES):
        _close_policy_engine(key)
    for llm in list(_OPEN):
        close_engine(llm)


atexit.register(close_all_engines)


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
