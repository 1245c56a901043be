"""Test doubles: scripted stand-ins for a model, whose text a function of the context decides.

``ScriptedBackend`` plays the policy in a rollout (``tirl.rollout.backend.GenerationBackend``): it pauses at a
closed ```python block and ends with EOS exactly like ``HFBackend``, so rollout bookkeeping can be checked token by
token. ``ScriptedChatBackend`` plays a chat backend of the data pipelines (``tirl.pipelines.chat_backends.ChatBackend``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tirl.pipelines.chat_backends import BackendStats, ChatParams, cut_at_stop
from tirl.rollout.types import Generation, SamplingParams, prompt_budgets
from tirl.tools.text_format import CODE_OPEN, code_block_end


class ScriptedBackend:
    def __init__(self, tokenizer, respond: Callable[[str], str]):
        """``respond(context_text)`` returns the full continuation the 'model' would write from that context."""
        self.tokenizer = tokenizer
        self.respond = respond
        self.calls = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_new_tokens: Sequence[int] | None = None) -> list[Generation]:
        """See ``GenerationBackend.generate``; each prompt is cut at its own budget."""
        self.calls += 1
        budgets = prompt_budgets(len(prompts), params, max_new_tokens)
        return [self._one(p, params, b) for p, b in zip(prompts, budgets)]

    def _one(self, prompt: list[int], params: SamplingParams, budget: int) -> Generation:
        text = self.respond(self.tokenizer.decode(prompt))
        reason = "eos"
        end = code_block_end(text) if params.stop_at_code else None
        if end is not None:
            text, reason = text[:end], "tool"
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        code_start = None
        if reason == "tool":
            prefix = text[: text.rindex(CODE_OPEN)]
            code_start = len(self.tokenizer.encode(prefix, add_special_tokens=False))
            # the text is encoded as (prefix, block) so the fence starts a token
            ids = self.tokenizer.encode(prefix, add_special_tokens=False) + self.tokenizer.encode(
                text[len(prefix):], add_special_tokens=False)
        else:
            ids = ids + [self.tokenizer.eos_token_id]
        if len(ids) > budget:
            ids, reason, code_start = ids[:budget], "length", None
        return Generation(ids, [0.0] * len(ids), [0.0] * len(ids), reason, code_start)


class ScriptedChatBackend:
    """``respond(messages, params) -> text``; ``ScriptedBackend``'s idea at the chat level: a data pipeline run on fixed replies whose right output is known."""

    def __init__(self, respond: Callable[[list[dict], ChatParams], str]):
        self.respond = respond
        self.stats = BackendStats()

    def complete(self, messages: list[dict], params: ChatParams) -> list[str]:
        self.stats.add(requests=1)
        texts = [cut_at_stop(self.respond(messages, params), params.stop) for _ in range(params.n)]
        self.stats.add(ok=1)
        return texts

    def close(self) -> None:
        pass
