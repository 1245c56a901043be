"""System prompts and prompt messages for the two tasks.

Kept short on purpose: the tiny model (vocab 1,024, byte-level BPE) pays one token per few characters, and a
prompt's length is paid again on every rollout. Real checkpoints read the same prompts.
"""

from __future__ import annotations

import json

MATH_SYSTEM_PROMPT = "Use python. Put the answer in \\boxed{}."

TOOLCALL_INSTRUCTION = (
    "Answer with [func(param=value), ...] to call functions, or in plain text if none applies."
)


def math_prompt(problem: str) -> list[dict]:
    """Messages for a math problem: the short THOR-style system prompt, then the problem."""
    return [{"role": "system", "content": MATH_SYSTEM_PROMPT}, {"role": "user", "content": problem}]


def tool_json(tool: dict) -> str:
    """One function as compact JSON, the way it appears in the system prompt."""
    return json.dumps(tool, separators=(",", ":"))


def toolcall_system_prompt(tools: list[dict]) -> str:
    """BFCL prompting style: the functions as JSON, one a line, then how to answer."""
    lines = "\n".join(tool_json(t) for t in tools)
    return f"Functions:\n{lines}\n{TOOLCALL_INSTRUCTION}"


def toolcall_prompt(query: str, tools: list[dict]) -> list[dict]:
    """Messages for a function-calling query: the tools in the system prompt, then the query."""
    return [{"role": "system", "content": toolcall_system_prompt(tools)}, {"role": "user", "content": query}]
