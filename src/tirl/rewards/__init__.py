"""Reward callables `(completions, answer, **columns) -> list[float]`, selected by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tirl.errors import UserError
from tirl.rewards.math import MathAnswerReward
from tirl.rewards.toolcall import ToolCallExactReward, ToolCallReward

RewardFn = Callable[..., list[float]]

_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "math": MathAnswerReward,
    "toolcall": ToolCallReward,  # D-CORE reward in [-3, 4]
    "toolcall_exact": ToolCallExactReward,  # 1/0 accuracy
}


# The 1/0 accuracy that val/acc and the held-out figures report, for a reward or a task of that name: the D-CORE
# reward in [-3, 4] is a training signal; its accuracy is bfcl-eval's verdict (toolcall_exact).
ACCURACY_REWARDS: dict[str, str] = {"math": "math", "toolcall": "toolcall_exact", "toolcall_exact": "toolcall_exact"}


class UnknownRewardError(UserError, ValueError):
    """A reward name that is not registered."""


def get_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build the reward callable registered as `name`, passing `kwargs` to its constructor."""
    if name not in _REWARDS:
        raise UnknownRewardError(f"Unknown reward {name!r}; choose one of {sorted(_REWARDS)}.")
    return _REWARDS[name](**kwargs)


__all__ = ["ACCURACY_REWARDS", "MathAnswerReward", "ToolCallReward", "ToolCallExactReward", "get_reward", "UnknownRewardError"]
