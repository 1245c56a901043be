"""Typed schemas of every config group: the one place that says what a key means and what it defaults to.

The yaml tree under ``configs/`` fills these in; ``tirl.config.validate`` checks a composed config against them
(unknown key → one sentence with the closest valid name) and converts each group to its dataclass, which is what
the modules receive. Defaults here are GRPO's; method presets (configs/method/*.yaml) set the papers' values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoraConfig:
    enabled: bool = False               # model.lora.enabled=true: train a peft LoRA adapter, base frozen
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-warm"     # HF hub id, local directory, or tiny / tiny-warm
    dtype: str = "float32"              # float32 | bfloat16 | float16 | auto
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    enable_thinking: bool = True        # passed to the tokenizer's chat template (Qwen3 reads it)
    tool_prompt: str = "system"         # system (tools listed in the system prompt, BFCL style) | template
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0                       # init seed for `tiny`


@dataclass
class SandboxConfig:
    kind: str = "local"                 # local | fusion
    workers: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 1024
    max_output_bytes: int = 65536
    url: str | None = None              # SandboxFusion base URL when kind=fusion
    require_isolation: bool = False     # local: refuse to start (one sentence) unless every threat is contained


@dataclass
class SelfCorrectionConfig:
    enabled: bool = False
    backtrack_tokens: int = 16          # tokens dropped before the failing code block
    max_corrections: int = 4            # N_corr: resamples per failed call before keeping the error


@dataclass
class RolloutConfig:
    backend: str = "hf"                 # hf | vllm
    max_prompt_tokens: int = 512
    max_new_tokens: int = 256           # per generation round
    max_total_tokens: int = 1024        # response budget over all rounds
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tool_rounds: int = 5
    max_tool_output_chars: int = 512    # long stdout shown as head … tail
    self_correction: SelfCorrectionConfig = field(default_factory=SelfCorrectionConfig)
    # vLLM: the first three apply on a GPU only (a CPU engine names those it ignores); the KV cache on a CPU is GiB
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = True
    cpu_kvcache_space_gb: int = 1       # VLLM_CPU_KVCACHE_SPACE; on a GPU the memory fraction above sizes it


@dataclass
class AdvantageConfig:
    scale: str = "group"                # group | batch | none (Dr. GRPO)
    eps: float = 1e-6


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None      # c for negative advantages (THOR: 3)
    agg: str = "token-mean"             # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    kl_coef: float = 0.0                # beta; 0 = no reference pass at all
    kl_kind: str = "k3"                 # k1 | k2 | k3 (low_var_kl)
    nll_coef: float = 0.0               # lambda of the NLL term on positive-advantage tokens (THOR: 0.01)
    nll_norm: str = "tokens"            # tokens: by the level's token-mean count | positive: by the mini-batch's
                                        #   positive-advantage token count (THOR's release)
    norm_len: int | None = None         # seq-mean-token-sum-norm constant (default: max response tokens)


@dataclass
class ShapingConfig:
    kind: str = "none"                  # none | da_grpo (D-CORE)
    alpha: float = 0.1
    delta: float = 0.5


@dataclass
class EpisodeFilterConfig:
    """THOR's episode level: which trajectories and groups enter the loss."""

    enabled: bool = False
    drop_failed_calls: bool = True
    drop_no_boxed: bool = True
    min_response_tokens: int = 8
    min_group_survivors: int = 2
    drop_zero_variance: bool = False    # DAPO: a group whose rewards are all equal teaches nothing; drop it
    zero_on_repetition: bool = True
    dynamic_sampling: bool = True       # refill the batch when groups are dropped
    max_sampling_rounds: int = 3


@dataclass
class StepLevelConfig:
    """THOR's step level: resample failed code blocks from a shared prefix; reward = the block runs."""

    enabled: bool = False
    suffix_tokens: int = 16             # L_suf: reasoning tokens before the failing block regenerated with it
    group_size: int = 8                 # continuations per failing prefix
    max_new_tokens: int = 128           # per continuation, within what rollout.max_total_tokens leaves after the prefix
    max_prefixes: int = 8               # failing prefixes per step
    weight: float = 1.0                 # L = L_episode + weight * L_step (THOR: 1; each level is its own token-mean)


@dataclass
class RolloutCorrectionConfig:
    """Rollout/trainer mismatch correction (issue 18): token-level truncated IS, needs old_log_probs=recompute."""

    kind: str = "none"                  # none | tis: weight min(pi_old / pi_rollout, cap) on the policy loss
    cap: float = 2.0                    # C (verl's tis_imp_ratio_cap, TRL's vllm_importance_sampling_cap: 2)


@dataclass
class RewardConfig:
    name: str | None = None             # math | toolcall (D-CORE) | toolcall_exact; null: data.task's (tirl.config.tasks)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "grpo"
    kind: str = "rl"                    # rl | sft
    metric: str = "val/acc"             # what the method's runs are judged by: optimized_metric, checkpoint monitor
    metric_mode: str = "max"            # max | min (sft: val/loss, min)
    module: dict[str, Any] = field(default_factory=lambda: {"_target_": "tirl.modules.grpo.GRPOModule"})
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"       # constant | cosine | linear
    max_grad_norm: float = 1.0
    # RL
    group_size: int = 8                 # G samples per prompt
    # update schedule (issue 18; tirl.rl.schedule): a round of rollout_batch_size prompts, split into mini-batches
    rollout_batch_size: int = 4         # prompts rolled out per round, over all ranks (the RL data batch size)
    mini_batch_size: int | None = None  # prompts per optimizer step over all ranks (whole groups); None = the round
    ppo_epochs: int = 1                 # passes over the round; steps per round = ppo_epochs x rollout/mini
    micro_batch_size: int = 8           # sequences per forward/backward (unless micro_batch_tokens is set)
    micro_batch_tokens: int | None = None   # max tokens per forward/backward, micro-batches balanced by tokens (verl's
                                        # use_dynamic_bsz); a longer sequence gets one of its own; None = micro_batch_size
    packing: bool = True                # padding-free update: a micro-batch's sequences in one row (exact; faster)
    shuffle_seed: int = 0               # seed of the per-epoch shuffle of groups into mini-batches
    old_log_probs: str = "rollout"      # rollout (sampler's) | recompute (trainer forward before the first update)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    episode_filter: EpisodeFilterConfig = field(default_factory=EpisodeFilterConfig)
    step_level: StepLevelConfig = field(default_factory=StepLevelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    log_samples: int = 4                # rollout samples per step in the samples table
    val_temperature: float = 0.0        # held-out rollouts: 0 = greedy accuracy; > 0 with val_samples = Avg@k
    val_samples: int = 1
    # SFT
    loss_on: str = "assistant"          # assistant | last_assistant

    def __post_init__(self) -> None:
        # From the config tree, validate() has already set the reward from data.task; a MethodConfig built in Python
        # without one scores math answers (the GRPO base's task).
        if self.reward.name is None:
            self.reward.name = "math"


@dataclass
class SyntheticConfig:
    """Options of the synthetic generators (``data.train=synthetic:math`` / ``synthetic:toolcall``); unset = default."""

    format: str = "rl"                  # rl (prompts) | sft (worked samples)
    size: int | None = None             # None: unlimited prompts (rl) / 1000 samples (sft)
    split: str = "train"                # train | sft | rl (disjoint halves of train); val/test: always heldout
    levels: list[int] | None = None     # math difficulty levels 1-4
    categories: list[str] | None = None # toolcall: simple, multiple, parallel, parallel_multiple, irrelevance
    max_tools: int | None = None        # toolcall: functions shown per prompt (>= 2)
    max_calls: int | None = None        # toolcall: calls per parallel answer (>= 2)


@dataclass
class DataConfig:
    """One datamodule; ``_target_`` picks it, the rest are its arguments."""

    _target_: str = "tirl.data.datamodules.RLPromptDataModule"
    task: str | None = None             # math | toolcall: the prompts' task, which picks the reward; null: from the sources
    train: Any = None                   # source: path (jsonl/parquet), HF id, `synthetic:math`, `synthetic:toolcall`, bfcl:<category>
    val: Any = None
    test: Any = None
    batch_size: int = 4
    num_workers: int = 0
    max_length: int = 512
    seed: int = 0
    on_bad_line: str = "error"          # error | skip (skipped lines are counted and logged)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    streaming: bool = False
    packing: bool = False
    val_size: int = 64


# ------------------------------------------------------------------ evaluation tasks (configs/task/, eval.yaml)

MATH_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
BFCL_V3_CATEGORIES = (
    "simple", "java", "javascript", "multiple", "parallel", "parallel_multiple", "irrelevance",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance",
    "live_relevance", "multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context",
)


@dataclass
class MathTaskConfig:
    name: str = "math"
    bench: list[str] = field(default_factory=lambda: list(MATH_BENCHMARKS))
    bench_dir: str | None = None        # local files <bench_dir>/<bench>.{jsonl,json,parquet} instead of the hub
    bench_paths: dict[str, str] = field(default_factory=dict)   # per bench: a file or an HF id (wins over bench_dir)
    limit: int | None = None            # first N problems of each benchmark
    n_samples: int = 1                  # samples per problem: Avg@n, pass@k for k <= n, best-of-n
    pass_k: list[int] = field(default_factory=lambda: [1])
    batch_size: int = 8                 # problems per generation batch (each with n_samples rollouts)
    temperature: float = 0.6            # overrides rollout.temperature for evaluation
    top_p: float = 0.95
    out_dir: str | None = None          # generations cache + results; null = this run's output dir


@dataclass
class BFCLTaskConfig:
    name: str = "bfcl"
    categories: list[str] = field(default_factory=lambda: list(BFCL_V3_CATEGORIES))
    source: str = "package"             # "package" (installed bfcl-eval) or a directory in BFCL's file layout
    limit: int | None = None            # first N entries of each category
    max_steps_per_turn: int = 20        # multi-turn: bfcl-eval's MAXIMUM_STEP_LIMIT
    batch_size: int = 8                 # single-turn prompts per generation batch
    temperature: float = 0.0            # overrides rollout.temperature (0 = greedy)
    top_p: float = 1.0
    lazy_min_reasoning_tokens: int = 200
    lazy_min_reflective: int = 3
    out_dir: str | None = None


EVAL_TASKS: dict[str, type] = {"math": MathTaskConfig, "bfcl": BFCLTaskConfig}   # src/eval.py task=


# ------------------------------------------------------------------ chat backends of the data pipelines (configs/backend/)


@dataclass
class HFBackendConfig:
    """In-process Hugging Face model (``backend@backends.<role>=hf``)."""

    kind: str = "hf"
    model: str = "tiny"                 # HF hub id, local directory, or tiny / tiny-warm
    dtype: str = "float32"
    enable_thinking: bool = True
    seed: int = 0                       # init seed of `tiny`


@dataclass
class HTTPBackendConfig:
    """Any OpenAI-compatible server (``backend@backends.<role>=http``)."""

    kind: str = "http"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "tiny"
    api_key_env: str | None = None      # name of the env var holding the key, e.g. OPENAI_API_KEY
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    extra_body: dict[str, Any] | None = None   # merged into each request body (server-specific options)


@dataclass
class VLLMBackendConfig:
    """vLLM offline engine (``backend@backends.<role>=vllm``); ``engine`` goes to ``vllm.LLM`` as keyword arguments."""

    kind: str = "vllm"
    model: str = "Qwen/Qwen3-8B"
    enable_thinking: bool = True
    cpu_kvcache_space_gb: int = 1       # KV cache on a CPU (GiB, VLLM_CPU_KVCACHE_SPACE); ignored on a GPU
    engine: dict[str, Any] = field(default_factory=dict)
