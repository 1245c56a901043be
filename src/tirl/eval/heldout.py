"""Held-out accuracy on the synthetic tasks: the number the tiny-model scripts and the embedded default print.

Greedy accuracy (or Avg@k when sampling) of tool-integrated rollouts on held-out synthetic problems, through
the same GRPOModule evaluation path that ``val/acc`` uses during training.
"""

from __future__ import annotations

from tirl.config.schema import MethodConfig, ModelConfig, RewardConfig, RolloutConfig, SandboxConfig

HELDOUT_SEED = 7
ACCURACY = {"math": "math", "toolcall": "toolcall_exact"}
# the rollout budgets of experiment=thor_tiny / dcore_tiny (model_defaults/tiny.yaml and the preset's overrides)
ROLLOUT = {
    "math": dict(max_new_tokens=128, max_total_tokens=256, max_tool_rounds=2),
    "toolcall": dict(max_new_tokens=160, max_total_tokens=160, max_tool_rounds=0),
}


def heldout_records(task: str, n: int, seed: int = HELDOUT_SEED) -> list[dict]:
    if task == "math":
        from tirl.data.synthetic_math import make_math_rl_prompts

        return make_math_rl_prompts(n, seed, split="heldout")
    if task == "toolcall":
        from tirl.data.synthetic_toolcall import make_toolcall_rl_prompts

        return make_toolcall_rl_prompts(n, seed, split="heldout", max_tools=2)
    raise ValueError(f"task='{task}' must be 'math' or 'toolcall'.")


def heldout_accuracy(model: str, task: str, n: int = 64, temperature: float = 0.0, samples: int = 1,
                     rollout: RolloutConfig | None = None, seed: int = HELDOUT_SEED) -> float:
    """Mean correctness over ``n`` held-out prompts (× ``samples`` when sampling) for a model id/path/name."""
    from tirl.models.load import load_tokenizer
    from tirl.modules.grpo import GRPOModule

    if task not in ROLLOUT:
        raise ValueError(f"task='{task}' must be 'math' or 'toolcall'.")
    rollout = rollout or RolloutConfig(**ROLLOUT[task])
    method = MethodConfig(reward=RewardConfig(name=ACCURACY[task]))
    module = GRPOModule(method, ModelConfig(name_or_path=model), rollout, SandboxConfig(workers=2), load_tokenizer(model))
    module.setup("validate")
    try:
        outs = module.validate_records(heldout_records(task, n, seed), temperature=temperature, samples=samples)
    finally:
        module.teardown("validate")
    return sum(o["correct"] for o in outs) / len(outs)
