"""Conversations -> token ids (+ loss masks), rendered by the tokenizer's own chat template.

The text a model reads is whatever ``tokenizer.apply_chat_template`` writes, tools included — the same text a
server (vLLM, SGLang) writes for that checkpoint. tirl never hand-writes turn markup.

Prompts are token-in-token-out: a prompt is the template's text with ``add_generation_prompt=True``, tokenised
once; a rollout appends the ids the model generated and the environment's ids after it.

Loss masks come from the same rendering. Assistant turn ``i`` is trained as the text the template writes for
``messages[:i+1]`` after the generation prompt of ``messages[:i]`` (render the prefix, diff) — exactly what a
rollout conditioned on that prompt would have produced. When the template rewrites history (Qwen3 drops the
reasoning of assistant turns before the last user query), a later turn's prompt no longer extends the earlier
turn's text and the conversation becomes several samples, each turn trained in the context it was generated
in. Tool output — ``tool`` turns, template text, and ```` ```output ```` blocks inside an assistant turn — never
receives loss; nor does what the template writes after the turn's end-of-turn token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

OUTPUT_BLOCK = re.compile(r"```output\n.*?\n```", re.S)
LOSS_ON = ("assistant", "last_assistant")


class ChatTemplateError(ValueError):
    """The tokenizer cannot render a conversation the way the checkpoint expects."""


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ChatTemplateError (one sentence) when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise ChatTemplateError(
            f"The tokenizer of '{name}' has no chat template, so tirl cannot render conversations for it; use an "
            "instruct/chat checkpoint or add a chat_template.jinja (e.g. its instruct sibling's) to the model directory.")


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None, *,
           add_generation_prompt: bool, enable_thinking: bool = True) -> str:
    """The template's text for ``messages`` (+ ``tools``); ends with the assistant header when generating.

    ``enable_thinking`` is passed to the template (Qwen3 reads it; templates that don't simply ignore it).
    Raises ChatTemplateError when the tokenizer has no chat template.
    """
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Rendered text -> ids; markup tokens are in the text already, so no BOS/EOS is added."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def split_model_and_tool(text: str) -> list[tuple[str, bool]]:
    """Split assistant text into (segment, is_model_written); ```output blocks are the environment's."""
    out, pos = [], 0
    for m in OUTPUT_BLOCK.finditer(text):
        if m.start() > pos:
            out.append((text[pos:m.start()], True))
        out.append((m.group(0), False))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], True))
    return out


def completion_mask(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """Ids and 0/1 loss mask of one assistant turn as the template rendered it after the generation prompt.

    Tokenised segment by segment, as a rollout concatenates generated ids and environment ids: ```output blocks
    get 0; so does whatever follows the turn's last special token (the end-of-turn token the model generates to
    stop, e.g. ``<|im_end|>``), such as the newline the template writes between turns.
    """
    ids, mask = [], []
    for seg, model_written in split_model_and_tool(text):
        t = encode_text(tokenizer, seg)
        ids += t
        mask += [int(model_written)] * len(t)
    special = set(tokenizer.all_special_ids)
    last = max((k for k, t in enumerate(ids) if t in special), default=len(ids) - 1)
    return ids, [m if k <= last else 0 for k, m in enumerate(mask)]


@dataclass
class EncodedTurns:
    """One trainable sequence: ids [T] and loss mask [T] (1 = model-written assistant token)."""

    input_ids: list[int]
    loss_mask: list[int]


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None,
                        loss_on: str = "assistant", enable_thinking: bool = True) -> list[EncodedTurns]:
    """Token ids and loss masks of a training conversation, rendered by the tokenizer's template.

    Usually one sequence; several when the template renders history differently from how each turn was generated
    (see the module docstring). ``loss_on``: ``assistant`` (every assistant turn) or ``last_assistant``.
    Raises ValueError for a bad ``loss_on``, a conversation without an assistant turn, or an assistant turn whose
    rendering does not extend its generation prompt (e.g. reasoning in a turn while ``enable_thinking=false``).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on='{loss_on}' must be 'assistant' or 'last_assistant'.")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("A training conversation needs at least one assistant turn.")
    if loss_on == "last_assistant":
        turns = turns[-1:]
    out: list[EncodedTurns] = []
    text = ""                 # the rendered text of the sequence being built (out[-1])
    for i in turns:
        prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True, enable_thinking=enable_thinking)
        full = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False, enable_thinking=enable_thinking)
        if not full.startswith(prompt):
            raise ValueError(
                f"Assistant turn {i} renders differently from its generation prompt (does it hold reasoning while "
                f"enable_thinking=false?); make the turn match what the model would generate after {prompt[-40:]!r}.")
        if out and prompt.startswith(text):      # the history is rendered as it was: extend the same sequence
            head = encode_text(tokenizer, prompt[len(text):])
        else:                                     # the template rewrote the history: a new sequence
            out.append(EncodedTurns([], []))
            head = encode_text(tokenizer, prompt)
        ids, mask = completion_mask(tokenizer, full[len(prompt):])
        out[-1].input_ids += head + ids
        out[-1].loss_mask += [0] * len(head) + mask
        text = full
    return out
