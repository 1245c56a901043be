"""A task's prompt, defined once: what a record's model is shown, and its ids.

``task_messages`` adds what the task adds (the math system prompt; the tools listed in the system message in BFCL
prompting style, or handed to the chat template), ``PromptEncoder`` renders that with the tokenizer's template and
left-truncates. Training, validation, the data pipelines and evaluation all go through these, so the same record
gives the same ids everywhere.

Records hold the conversation without the task's additions: ``{"task": "math", "messages": [user]}``,
``{"task": "toolcall", "messages": [user], "tools": [...]}``. A record's own system message wins over the math
system prompt; the tool listing is appended to it.

Kept short on purpose: the tiny model (vocab 1,024, byte-level BPE) pays one token per few characters, and a
prompt's length is paid again on every rollout. Real checkpoints read the same prompts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from tirl.data.chat_template import (
    EncodedTurns,
    encode_conversation,
    encode_rendered,
    environment_pieces,
    render,
)

log = logging.getLogger(__name__)

MATH_SYSTEM_PROMPT = "Use python. Put the answer in \\boxed{}."

TOOLCALL_INSTRUCTION = (
    "Answer with [func(param=value), ...] to call functions, or in plain text if none applies."
)

# How a record's tools are shown: listed in the system message with the instruction to answer with a Python call
# list (BFCL prompting mode, what D-CORE's reward reads), or handed to the chat template (the checkpoint's own
# function-calling format, e.g. Qwen3's "# Tools" section and <tool_call> JSON, which the reward also reads).
TOOL_PROMPTS = ("system", "template")


def tool_json(tool: dict) -> str:
    """One function as compact JSON, the way it appears in the system prompt."""
    return json.dumps(tool, separators=(",", ":"))


def toolcall_system_prompt(tools: list[dict]) -> str:
    """BFCL prompting style: the functions as JSON, one a line, then how to answer."""
    lines = "\n".join(tool_json(t) for t in tools)
    return f"Functions:\n{lines}\n{TOOLCALL_INSTRUCTION}"


def math_record(question: str) -> dict:
    """A math problem as the math task's record; its prompt (system prompt included) comes from ``task_messages``."""
    return {"task": "math", "messages": [{"role": "user", "content": question}]}


def _with_system(messages: list[dict], text: str, append: bool) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        if not append:
            return messages
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def task_messages(record: dict, tool_prompt: str = "system") -> tuple[list[dict], list[dict] | None]:
    """(messages, tools for the chat template) a model is shown for ``record``.

    ``task == "math"``: the math system prompt first unless the record has its own system message. Tools (any task):
    ``tool_prompt="system"`` lists them in the system message (template tools None), ``"template"`` returns them for
    the chat template; a record with ``tools_in_messages`` true shows its own listing (its ``tools`` are then only
    for the reward). Raises ValueError for an unknown ``tool_prompt``.
    """
    if tool_prompt not in TOOL_PROMPTS:
        raise ValueError(f"tool_prompt='{tool_prompt}' must be one of {list(TOOL_PROMPTS)}.")
    messages = list(record["messages"])
    if record.get("task") == "math":
        messages = _with_system(messages, MATH_SYSTEM_PROMPT, append=False)
    tools = record.get("tools") or None
    if tools and record.get("tools_in_messages"):   # the messages list them already (BFCL's own system prompt)
        return messages, None
    if tools and tool_prompt == "system":
        return _with_system(messages, toolcall_system_prompt(tools), append=True), None
    return messages, tools


@dataclass
class PromptEncoder:
    """Records -> prompt ids (and SFT sequences), the one place a prompt is rendered and tokenised.

    ``max_prompt_tokens``: longer prompts keep their end (the question and the assistant header), are counted in
    ``truncated`` and warned about once — the lost beginning is often the system prompt with the tools.
    """

    tokenizer: Any
    enable_thinking: bool = True
    tool_prompt: str = "system"
    max_prompt_tokens: int | None = None
    truncated: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.tool_prompt not in TOOL_PROMPTS:
            raise ValueError(f"model.tool_prompt='{self.tool_prompt}' must be one of {list(TOOL_PROMPTS)}.")

    def messages(self, record: dict) -> tuple[list[dict], list[dict] | None]:
        return task_messages(record, self.tool_prompt)

    def text(self, record: dict) -> str:
        """The prompt text: the record's conversation as shown, then the assistant header."""
        messages, tools = self.messages(record)
        return render(self.tokenizer, messages, tools, add_generation_prompt=True, enable_thinking=self.enable_thinking)

    def _full_ids(self, record: dict) -> list[int]:
        # tool turns in the prompt are environment text: plain tokens, as SFT and rollouts encode them
        return encode_rendered(self.tokenizer, self.text(record), environment_pieces(self.messages(record)[0]))[0]

    def length(self, record: dict) -> int:
        """Prompt length in tokens before truncation."""
        return len(self._full_ids(record))

    def ids(self, record: dict, max_prompt_tokens: int | None = None) -> list[int]:
        """Prompt ids [≤ max_prompt_tokens (default: the encoder's)], left-truncated."""
        ids = self._full_ids(record)
        limit = max_prompt_tokens or self.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            if not self.truncated:
                log.warning("A %d-token prompt (id %s) is longer than rollout.max_prompt_tokens=%d and loses its "
                            "beginning; raise rollout.max_prompt_tokens.", len(ids), record.get("id"), limit)
            self.truncated += 1
            ids = ids[-limit:]
        return ids

    def conversation(self, record: dict, loss_on: str = "assistant") -> list[EncodedTurns]:
        """An SFT record's training sequences (``tirl.data.chat_template.encode_conversation``) with the task's prompt."""
        messages, tools = self.messages(record)
        return encode_conversation(self.tokenizer, messages, tools, loss_on, self.enable_thinking)
