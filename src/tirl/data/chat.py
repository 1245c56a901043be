"""Render conversations to token ids with a loss mask, the same way rollouts build them.

Text is tokenised segment by segment (turn headers, model-written text, tool output), exactly as a rollout
concatenates generated ids and environment ids, so SFT and RL see identical token sequences for identical text.
Tool output — ``tool`` turns and ```` ```output ```` blocks inside an assistant turn — never receives loss, and is
plain text to the tokenizer (a printed ``<|im_end|>`` stays ordinary tokens, never the end-of-turn id). Who wrote
which span of an assistant turn comes from structure: the message's ``env_spans`` (character ``[start, end)``
pairs of environment text, as TIRGen and the synthetic data record them). Only a hand-written turn without
``env_spans`` has its ```` ```output ```` blocks found by pattern, which cannot tell an output that itself prints a
fence from the model's text — record ``env_spans`` for such data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

OUTPUT_BLOCK = re.compile(r"```output\n.*?\n```", re.S)
THINK_EMPTY = "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class ChatFormat:
    """Turn markup of one model family. ``{role}`` is filled in; tool results use ``tool_role`` + wrapping."""

    name: str
    begin: str
    header: str
    end_of_turn: str
    after_turn: str
    tool_role: str
    tool_open: str
    tool_close: str

    def head(self, role: str) -> str:
        return self.header.format(role=self.tool_role if role == "tool" else role)


CHAT_FORMATS = {
    # Qwen2.5 / Qwen3 / the tiny model.
    "chatml": ChatFormat("chatml", "", "<|im_start|>{role}\n", "<|im_end|>", "\n", "user",
                         "<tool_response>\n", "\n</tool_response>"),
    # Llama 3.1 instruct.
    "llama3": ChatFormat("llama3", "<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", "",
                         "ipython", "", ""),
}


def get_chat_format(name: str) -> ChatFormat:
    if name not in CHAT_FORMATS:
        raise ValueError(f"Unknown chat format '{name}'; valid choices: {sorted(CHAT_FORMATS)}.")
    return CHAT_FORMATS[name]


def render_prompt(messages: list[dict], fmt: ChatFormat, add_generation_prompt: bool = True,
                  enable_thinking: bool = True) -> str:
    """The text a model is conditioned on; ends with the assistant header when generating."""
    parts = [fmt.begin]
    for m in messages:
        body = fmt.tool_open + m["content"] + fmt.tool_close if m["role"] == "tool" else m["content"]
        parts.append(fmt.head(m["role"]) + body + fmt.end_of_turn + fmt.after_turn)
    if add_generation_prompt:
        parts.append(fmt.head("assistant") + ("" if enable_thinking else THINK_EMPTY))
    return "".join(parts)


def split_model_and_tool(text: str, env_spans: list | None = None) -> list[tuple[str, bool]]:
    """Split assistant text into (segment, is_model_written). ``env_spans`` ([start, end) character pairs, sorted)
    say which text the environment wrote; without them ```output blocks are taken to be the environment's."""
    if env_spans is None:
        env_spans = [(m.start(), m.end()) for m in OUTPUT_BLOCK.finditer(text)]
    out, pos = [], 0
    for start, end in env_spans:
        if start > pos:
            out.append((text[pos:start], True))
        if end > start:
            out.append((text[start:end], False))
        pos = max(pos, end)
    if pos < len(text):
        out.append((text[pos:], True))
    return out


def model_written_text(text: str, env_spans: list | None = None) -> str:
    """The assistant text with the environment's spans left out: what format filters and rewards may read."""
    return "".join(seg for seg, model_written in split_model_and_tool(text, env_spans) if model_written)


def encode_environment(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Environment text (tool output) as ordinary tokens: special-token strings in it are not parsed, so code that
    prints ``<|im_end|>`` cannot end a turn."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []


def tokenize_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat, loss_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 = model-written assistant token, incl. its end-of-turn token)."""
    if loss_on not in ("assistant", "last_assistant"):
        raise ValueError(f"loss_on='{loss_on}' must be 'assistant' or 'last_assistant'.")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise ValueError("A training conversation needs at least one assistant turn.")

    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False) if s else []

    ids: list[int] = enc(fmt.begin)
    mask: list[int] = [0] * len(ids)
    for i, m in enumerate(messages):
        train = m["role"] == "assistant" and (loss_on == "assistant" or i == last)
        head = enc(fmt.head(m["role"]))
        ids += head
        mask += [0] * len(head)
        # (text, model_written, markup): environment text that is not markup is encoded as plain text
        if m["role"] == "assistant":
            segments = [(seg, mw, mw) for seg, mw in split_model_and_tool(m["content"], m.get("env_spans"))]
            segments.append((fmt.end_of_turn, True, True))
        elif m["role"] == "tool":
            segments = [(fmt.tool_open, False, True), (m["content"], False, False),
                        (fmt.tool_close + fmt.end_of_turn, False, True)]
        else:
            segments = [(m["content"] + fmt.end_of_turn, False, True)]
        for seg, model_written, markup in segments:
            t = enc(seg) if markup else encode_environment(tokenizer, seg)
            ids += t
            mask += [int(train and model_written)] * len(t)
        tail = enc(fmt.after_turn)
        ids += tail
        mask += [0] * len(tail)
    return ids, mask
