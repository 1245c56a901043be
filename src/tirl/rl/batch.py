"""From trajectories to padded tensors: one training sequence per sample, loss only where the model wrote."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One sequence to train on: ``context`` gets no loss; ``response`` tokens get loss where ``response_mask`` is 1."""

    context: list[int]
    response: list[int]
    response_mask: list[int]
    old_log_probs: list[float]
    entropies: list[float]
    advantage: float
    level: str = "episode"        # episode | step (THOR)
    group: int = 0                # samples of one (level, group) share an advantage baseline: a mini-batch keeps them


@dataclass
class TensorBatch:
    input_ids: torch.Tensor       # [N, L] right-padded context+response
    attention_mask: torch.Tensor  # [N, L]
    targets: torch.Tensor         # [N, L-1] next tokens (input_ids shifted left)
    response_mask: torch.Tensor   # [N, L-1] 1 where the target is a model-written response token
    old_log_probs: torch.Tensor   # [N, L-1] the rollout policy's log-probs of the targets
    entropy: torch.Tensor         # [N, L-1]
    advantages: torch.Tensor      # [N, L-1] per token (after any shaping)
    level: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: list[int]) -> TensorBatch:
        """Rows ``idx``, trimmed to their own longest sequence (micro-batches pad only to themselves)."""
        ix = torch.tensor(idx, dtype=torch.long)
        width = int(self.attention_mask[ix].sum(-1).max())
        return TensorBatch(
            self.input_ids[ix, :width], self.attention_mask[ix, :width], self.targets[ix, : width - 1],
            self.response_mask[ix, : width - 1], self.old_log_probs[ix, : width - 1], self.entropy[ix, : width - 1],
            self.advantages[ix, : width - 1], [self.level[i] for i in idx],
        )

    def response_window(self) -> TensorBatch:
        """The same rows with the per-token tensors cut to start at the first column any row has a loss token in.

        ``input_ids`` keep their full width (the model must read the prompt); callers ask the model for the last
        ``response_mask.shape[1] + 1`` positions' logits only (``logits_to_keep``), which line up with the cut tensors.
        """
        cols = self.response_mask.sum(0).nonzero()
        start = int(cols[0]) if len(cols) else self.response_mask.shape[1] - 1
        if start == 0:
            return self
        return TensorBatch(self.input_ids, self.attention_mask, self.targets[:, start:],
                           self.response_mask[:, start:], self.old_log_probs[:, start:], self.entropy[:, start:],
                           self.advantages[:, start:], self.level)

    def to(self, device) -> TensorBatch:
        return TensorBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.targets,
                                                   self.response_mask, self.old_log_probs, self.entropy,
                                                   self.advantages)), self.level)

    def shared_contexts(self) -> SharedContextBatch | None:
        """The rows split into distinct contexts and their continuations, or None when no two rows share one.

        A row's context is everything up to its first loss token (for an episode sample: the prompt), so the G
        samples of a group share one. The model can then read each context once and continue every row from the
        context's KV cache: the same log-probs and, as the cache is expanded by indexing, the same gradient, for
        (G-1)/G less work on the context tokens. A row with no loss token at all leaves the batch unsplit.
        """
        has_loss = self.response_mask.bool()                                              # [N, L-1]
        if not bool(has_loss.any(-1).all()):
            return None
        ctx_len = has_loss.float().argmax(-1) + 1                # tokens before the first loss target, per row [N]
        lengths = self.attention_mask.sum(-1)                                             # [N]
        keys = [tuple(row[:c].tolist()) for row, c in zip(self.input_ids, ctx_len.tolist())]
        index = {k: j for j, k in enumerate(dict.fromkeys(keys))}
        if len(index) == len(keys):
            return None
        distinct = list(index)
        row_ctx = torch.tensor([index[k] for k in keys], device=self.input_ids.device)
        u = len(distinct)
        width_c = max(len(k) for k in distinct)
        ctx_ids = self.input_ids.new_zeros((u, width_c))
        ctx_attn = self.attention_mask.new_zeros((u, width_c))
        for j, k in enumerate(distinct):    # left-padded, so every context ends where its continuations start
            ctx_ids[j, width_c - len(k):] = torch.tensor(k, dtype=ctx_ids.dtype)
            ctx_attn[j, width_c - len(k):] = 1
        n_resp = lengths - ctx_len                                     # continuation tokens per row [N]
        width_r = int(n_resp.max())
        k = torch.arange(width_r, device=self.input_ids.device)
        valid = k[None, :] < n_resp[:, None]                                              # [N, R]
        # continuation token k of row i is input column ctx_len_i + k and target column ctx_len_i - 1 + k
        col = (ctx_len[:, None] - 1 + k[None, :]).clamp(max=self.targets.shape[1] - 1)    # [N, R]
        resp_ids = torch.where(valid, self.input_ids.gather(1, col + 1), torch.zeros_like(col))

        def per_token(t: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, t.gather(1, col), torch.zeros((), dtype=t.dtype, device=t.device))

        tokens = TensorBatch(resp_ids, valid.long(), resp_ids, per_token(self.response_mask),
                             per_token(self.old_log_probs), per_token(self.entropy), per_token(self.advantages),
                             self.level)
        return SharedContextBatch(
            ctx_ids, ctx_attn, (ctx_attn.cumsum(-1) - 1).clamp(min=0), row_ctx,
            torch.cat([ctx_attn[row_ctx], valid.long()], dim=-1), ctx_len[:, None] + k[None, :], tokens,
        )


@dataclass
class SharedContextBatch:
    """A micro-batch as distinct contexts plus continuations: the model reads ``ctx_ids`` once (use_cache), the
    cache is indexed by ``row_ctx`` to one entry per row, and ``tokens.input_ids`` continue from it. The
    context's last logit predicts continuation token 0; the continuation's logit k predicts token k + 1."""

    ctx_ids: torch.Tensor         # [U, C] distinct contexts, left-padded
    ctx_attn: torch.Tensor        # [U, C]
    ctx_pos: torch.Tensor         # [U, C] position ids
    row_ctx: torch.Tensor         # [N] which context each row continues
    attention_mask: torch.Tensor  # [N, C + R] the row's context mask, then its continuation's
    position_ids: torch.Tensor    # [N, R] continuation positions (right after the context)
    tokens: TensorBatch           # [N, R] continuation ids as input and targets, per-token tensors re-indexed

    def tokens_read(self) -> int:
        """Token positions the shared-context pass computes, padding included: U·C contexts + N·R continuations."""
        return self.ctx_ids.numel() + self.tokens.input_ids.numel()


@dataclass
class PackedBatch:
    """A micro-batch as one padding-free row: its sequences back to back, positions restarting at 0 per sequence
    (so transformers keeps attention inside each sequence: the block-diagonal mask of SDPA/eager, flash-attention's
    varlen path), plus where each loss token's prediction sits. Only loss tokens get logits: prompts, tool outputs
    and padding cost no lm_head. ``values[k]`` computed at ``logit_pos[k]`` belongs to target ``(rows[k], cols[k])``."""

    input_ids: torch.Tensor       # [1, T] T = the micro-batch's real tokens (no padding)
    position_ids: torch.Tensor    # [1, T] 0..len_i-1 per sequence
    logit_pos: torch.Tensor       # [K] packed position whose next-token prediction is loss token k
    rows: torch.Tensor            # [K] its row in the micro-batch's [N, L-1] target layout
    cols: torch.Tensor            # [K] its column there
    targets: torch.Tensor         # [K] the token it predicts

    def unpack(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-loss-token ``values`` [K] put back in the [N, L-1] target layout of ``like``; 0 elsewhere (the
        gradient flows to ``values``)."""
        out = values.new_zeros(like.shape)
        return out.index_put((self.rows, self.cols), values)


def pack_rows(mb: TensorBatch) -> PackedBatch:
    """``mb``'s rows packed into one row (``PackedBatch``). A row with no loss token is still packed (it costs its
    tokens but predicts nothing); an empty micro-batch gives T = K = 0."""
    lengths = mb.attention_mask.sum(-1)                                                   # [N]
    keep = mb.attention_mask.bool()                                                       # [N, L] right-padded
    ids = mb.input_ids[keep][None]                                                        # [1, T]
    pos = (mb.attention_mask.cumsum(-1) - 1)[keep][None]                                  # [1, T]
    offsets = lengths.cumsum(0) - lengths                                                 # [N] first packed index
    rows, cols = mb.response_mask.bool().nonzero(as_tuple=True)                           # [K] each
    return PackedBatch(ids, pos, offsets[rows] + cols, rows, cols, mb.targets[rows, cols])


def collate_samples(samples: list[Sample], pad_id: int) -> TensorBatch:
    n = len(samples)
    width = max(len(s.context) + len(s.response) for s in samples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width - 1))
    old = torch.zeros((n, width - 1))
    ent = torch.zeros((n, width - 1))
    adv = torch.zeros((n, width - 1))
    for i, s in enumerate(samples):
        c, r = len(s.context), len(s.response)
        ids[i, : c + r] = torch.tensor(s.context + s.response)
        attn[i, : c + r] = 1
        # the target at position j is token j+1, so response token k sits at position c-1+k
        sl = slice(c - 1, c - 1 + r)
        mask[i, sl] = torch.tensor(s.response_mask, dtype=torch.float)
        old[i, sl] = torch.tensor(s.old_log_probs)
        ent[i, sl] = torch.tensor(s.entropies)
        adv[i, sl] = s.advantage
    return TensorBatch(ids, attn, ids[:, 1:].clone(), mask, old, ent, adv * mask, [s.level for s in samples])


def window_to_targets(values: torch.Tensor, mb: TensorBatch, shared: SharedContextBatch | None) -> torch.Tensor:
    """Per-token ``values`` of the tensors a loss pass reads (``mb.response_window()`` [N, W], or ``shared.tokens``
    [N, R]) put back in ``mb``'s target columns [N, L-1]; 0 where the pass read nothing."""
    out = values.new_zeros(mb.response_mask.shape)
    if shared is None:
        out[:, mb.response_mask.shape[1] - values.shape[1]:] = values
        return out
    valid = shared.tokens.attention_mask.bool()                                        # [N, R]
    rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(valid)
    out[rows[valid], (shared.position_ids - 1)[valid]] = values[valid]       # continuation k is column ctx_len-1+k
    return out
