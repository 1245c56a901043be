"""Generation backends: token ids in, continuations (with log-probs and entropies) out.

``HFBackend`` runs any Hugging Face causal LM with its own short sampling loop over the KV cache rather than
``model.generate``: the loop records the rollout policy's log-prob and entropy of every sampled token at the
rollout temperature as it goes (``generate`` would have to keep B×T×V scores for that) and pauses each sample the
moment its ```python block closes, while the rest of the batch continues.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from tirl.rollout.types import Generation, SamplingParams

OPEN_FENCE = "```python"
CLOSE_FENCE = "\n```"


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]: ...


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k and the top-p nucleus. logits: [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def backtick_tokens(tokenizer) -> frozenset[int]:
    """Ids whose text contains a backtick: only around those can a code fence open or close."""
    cached = getattr(tokenizer, "_tirl_backtick_ids", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        cached = frozenset(i for i in vocab.values() if "`" in tokenizer.decode([i]))
        tokenizer._tirl_backtick_ids = cached
    return cached


class FenceWatcher:
    """Per-sample check for a closed ```python block, decoding text only near tokens that hold a backtick."""

    WINDOW = 8  # tokens after a backtick token in which "python" / the closing newline may still arrive

    def __init__(self, tokenizer, backticks: frozenset[int]):
        self.tokenizer = tokenizer
        self.backticks = backticks
        self.ids: list[int] = []
        self.since_tick = self.WINDOW + 1
        self.opened = False

    def push(self, token_id: int) -> bool:
        """Add a token; True when it closes an open code block."""
        self.ids.append(token_id)
        self.since_tick = 0 if token_id in self.backticks else self.since_tick + 1
        if self.since_tick > self.WINDOW:
            return False
        text = self.tokenizer.decode(self.ids)
        start = text.find(OPEN_FENCE)
        if start < 0:
            return False
        self.opened = True
        return text.find(CLOSE_FENCE, start + len(OPEN_FENCE)) >= 0


class HFBackend:
    """Batched sampling from a transformers causal LM (left padding, KV cache)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 64, stop_token_ids: list[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        stops = set(stop_token_ids or [])
        for tok in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    tokenizer.convert_tokens_to_ids("<|endoftext|>")):
            if isinstance(tok, int) and tok >= 0 and tok != tokenizer.unk_token_id:
                stops.add(tok)
        self.stop_token_ids = sorted(stops)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch_size):
            out += self._generate(prompts[i:i + self.max_batch_size], params)
        return out

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id
        B, L = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, L), pad, dtype=torch.long, device=device)
        attn = torch.zeros((B, L), dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            input_ids[b, L - len(p):] = torch.tensor(p, device=device)
            attn[b, L - len(p):] = 1
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        stop_ids = torch.tensor(self.stop_token_ids, device=device)

        ids = [[] for _ in range(B)]
        logps = [[] for _ in range(B)]
        ents = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = torch.zeros(B, dtype=torch.bool, device=device)
        backticks = backtick_tokens(self.tokenizer) if params.stop_at_code else frozenset()
        watchers = [FenceWatcher(self.tokenizer, backticks) for _ in range(B)] if params.stop_at_code else None
        code_starts: list[int | None] = [None] * B

        out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :].float()
        next_pos = position_ids[:, -1:] + 1
        for _ in range(params.max_new_tokens):
            temp = params.temperature if params.temperature > 0 else 1.0
            logp_all = F.log_softmax(logits / temp, dim=-1)                       # [B, V]
            entropy = -(logp_all.exp() * logp_all).sum(-1)                        # [B]
            if params.temperature > 0:
                sample_logits = filter_logits(logits / temp, params.top_k, params.top_p)
                token = torch.multinomial(sample_logits.softmax(-1), 1).squeeze(-1)
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            token_logp = logp_all.gather(-1, token[:, None]).squeeze(-1)
            tok_list, lp_list, ent_list = token.tolist(), token_logp.tolist(), entropy.tolist()
            is_stop = torch.isin(token, stop_ids)
            for b in range(B):
                if done[b]:
                    continue
                ids[b].append(tok_list[b])
                logps[b].append(lp_list[b])
                ents[b].append(ent_list[b])
                if is_stop[b]:
                    reasons[b], done[b] = "eos", True
                elif watchers is not None and watchers[b].push(tok_list[b]):
                    reasons[b], done[b] = "tool", True
                    code_starts[b] = self._fence_token(ids[b])
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=-1)
            out = model(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos,
                        past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        model.train(was_training)
        return [Generation(ids[b], logps[b], ents[b], reasons[b], code_starts[b]) for b in range(B)]

    def _fence_token(self, ids: list[int]) -> int:
        """Index of the token in which the last ```python fence starts (exact, by decoding prefixes)."""
        text = self.tokenizer.decode(ids)
        start = text.rfind(OPEN_FENCE)
        lo, hi = 0, len(ids)  # smallest k such that decode(ids[:k+1]) reaches past `start`
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid + 1])) > start:
                hi = mid
            else:
                lo = mid + 1
        return lo
