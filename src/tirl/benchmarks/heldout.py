"""Held-out accuracy on the synthetic tasks: the number the tiny-model scripts and the embedded default print.

Greedy accuracy (or Avg@k when sampling) of tool-integrated rollouts on held-out synthetic problems, through
the same GRPOModule evaluation path that ``val/acc`` uses during training.
"""

from __future__ import annotations

from tirl.config.schema import MethodConfig, ModelConfig, RewardConfig, RolloutConfig, SandboxConfig
from tirl.rewards import ACCURACY_REWARDS

HELDOUT_SEED = 7
PRESETS = {"math": "thor_tiny", "toolcall": "dcore_tiny"}   # the experiment whose rollout a task is scored with


def preset_rollout(task: str, **overrides) -> RolloutConfig:
    """The rollout settings (token budgets, tool rounds) of ``experiment=thor_tiny`` (math) or ``dcore_tiny``
    (toolcall), read from the composed config so they are never restated here; ``overrides`` replace fields."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tirl.config import CONFIG_DIR, validate

    if task not in PRESETS:
        raise ValueError(f"task='{task}' must be 'math' or 'toolcall'.")
    overrides_argv = [f"experiment={PRESETS[task]}"]
    if GlobalHydra.instance().is_initialized():          # inside a caller's Hydra context (an app, a test)
        cfg = compose("train", overrides=overrides_argv)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides_argv)
    return dataclasses.replace(validate(cfg).rollout, **overrides)


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

    rollout = rollout or preset_rollout(task)
    method = MethodConfig(reward=RewardConfig(name=ACCURACY_REWARDS[task]))
    module = GRPOModule(method, ModelConfig(name_or_path=model), rollout, SandboxConfig(workers=2), load_tokenizer(model))
    module.setup("validate")
    try:
        outs = module.validate_records(heldout_records(task, n, seed), temperature=temperature, samples=samples)
    finally:
        module.teardown("validate")
    return sum(o["correct"] for o in outs) / len(outs)
