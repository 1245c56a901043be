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

Environment text (the content of ``tool`` turns and the output spans of an assistant turn) is plain text to the
tokenizer: a printed ``<|im_end|>`` stays ordinary tokens, never the end-of-turn id, in SFT sequences, RL prompts
and rollouts alike. Who wrote which span of an assistant turn comes from structure: the message's ``env_spans``
(character ``[start, end)`` pairs of environment text, as TIRGen and the synthetic data record them). Only a
hand-written turn without ``env_spans`` has its ```` ```output ```` blocks found by pattern, which cannot tell an
output that itself prints a fence from the model's text — record ``env_spans`` for such data.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tirl.tools.text_format import OUTPUT_BLOCK

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
    messages = [_reasoning_apart(m) for m in messages]
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)


def _reasoning_apart(message: dict) -> dict:
    """An assistant message whose tool output prints ``</think>``, with its reasoning handed to the template as
    ``reasoning_content``: templates that find the reasoning by splitting the content at the last ``</think>``
    (Qwen3's) would otherwise cut at the printed one. The split is at the model's own first ``</think>``, found
    from structure (``env_spans``); any other message is returned as it is."""
    if message.get("role") != "assistant" or "reasoning_content" in message or "</think>" not in message["content"]:
        return message
    segments = split_model_and_tool(message["content"], message.get("env_spans"))
    if not any(not mw and "</think>" in seg for seg, mw in segments):
        return message
    pos, cut = 0, None
    for seg, mw in segments:
        if mw and "</think>" in seg:
            cut = pos + seg.index("</think>")
            break
        pos += len(seg)
    content = message["content"]
    if cut is None:       # no reasoning of its own: all of it is the answer
        reasoning, answer = "", content
    else:
        reasoning = content[:cut].split("<think>")[-1].strip("\n")
        answer = content[cut + len("</think>"):].lstrip("\n")
    return {**message, "content": answer, "reasoning_content": reasoning}


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Rendered text -> ids; markup tokens are in the text already, so no BOS/EOS is added."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


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


def environment_pieces(messages: list[dict]) -> list[str]:
    """The environment's texts in ``messages``, in order: each ``tool`` turn's content and each output span of an
    assistant turn (``env_spans``, else its ```output blocks)."""
    pieces = []
    for m in messages:
        if m["role"] == "tool":
            pieces.append(m["content"])
        elif m["role"] == "assistant":
            pieces += [seg for seg, mw in split_model_and_tool(m["content"], m.get("env_spans")) if not mw]
    return [p for p in pieces if p]


def encode_rendered(tokenizer: PreTrainedTokenizerBase, text: str,
                    pieces: list[str]) -> tuple[list[int], list[int]]:
    """Ids of template-rendered ``text`` and a 0/1 flag per id (1 = environment text).

    ``pieces`` (``environment_pieces`` of the rendered messages) are found in order in ``text`` and encoded as
    plain text (``encode_environment``); the rest — markup, user and model text — with special tokens parsed.
    Raises ValueError when the template did not write a piece verbatim.
    """
    ids, env, pos = [], [], 0
    for piece in pieces:
        start = text.find(piece, pos)
        if start < 0:
            raise ValueError(f"The chat template did not render the tool output {piece[:40]!r} verbatim, so tirl "
                             "cannot keep it out of the loss; check the template's tool-turn markup.")
        head, body = encode_text(tokenizer, text[pos:start]), encode_environment(tokenizer, piece)
        ids += head + body
        env += [0] * len(head) + [1] * len(body)
        pos = start + len(piece)
    tail = encode_text(tokenizer, text[pos:])
    return ids + tail, env + [0] * len(tail)


def completion_mask(tokenizer: PreTrainedTokenizerBase, text: str,
                    pieces: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Ids and 0/1 loss mask of one assistant turn as the template rendered it after the generation prompt.

    Tokenised segment by segment, as a rollout concatenates generated ids and environment ids: the environment's
    ``pieces`` (default: the turn's ```output blocks) are plain text and get 0; so does whatever follows the turn's
    last special token (the end-of-turn token the model generates to stop, e.g. ``<|im_end|>``), such as the
    newline the template writes between turns.
    """
    if pieces is None:
        pieces = [seg for seg, mw in split_model_and_tool(text) if not mw]
    ids, env = encode_rendered(tokenizer, text, pieces)
    mask = [1 - e for e in env]
    special = set(tokenizer.all_special_ids)
    last = max((k for k, t in enumerate(ids) if t in special and not env[k]), default=len(ids) - 1)
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
    prev = -1                 # the assistant turn that sequence ends with
    for i in turns:
        prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True, enable_thinking=enable_thinking)
        full = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False, enable_thinking=enable_thinking)
        if not full.startswith(prompt):
            raise ValueError(
                f"Assistant turn {i} renders differently from its generation prompt (does it hold reasoning while "
                f"enable_thinking=false?); make the turn match what the model would generate after {prompt[-40:]!r}.")
        if out and prompt.startswith(text):      # the history is rendered as it was: extend the same sequence
            head, _ = encode_rendered(tokenizer, prompt[len(text):], environment_pieces(messages[prev + 1:i]))
        else:                                     # the template rewrote the history: a new sequence
            out.append(EncodedTurns([], []))
            head, _ = encode_rendered(tokenizer, prompt, environment_pieces(messages[:i]))
        ids, mask = completion_mask(tokenizer, full[len(prompt):], environment_pieces(messages[i:i + 1]))
        out[-1].input_ids += head + ids
        out[-1].loss_mask += [0] * len(head) + mask
        text, prev = full, i
    return out
