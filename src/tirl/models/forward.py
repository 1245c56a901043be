"""The policy forward of the RL update: next-token logits lined up with a batch's per-token tensors, reading a
context shared by several rows once (``tirl.rl.batch.SharedContextBatch``) when the model allows it."""

from __future__ import annotations

import torch

from tirl.models.kv_cache import CACHE, returned_cache
from tirl.rl.batch import SharedContextBatch, TensorBatch


def sequence_logits(model, tok: TensorBatch, shared: SharedContextBatch | None) -> torch.Tensor:
    """Next-token logits lined up with the per-token tensors of ``tok`` (``shared.tokens`` when contexts are
    shared; else a response window, whose input ids are the whole sequences). Shape [N, W, V]."""
    if shared is None:
        keep = tok.response_mask.shape[1] + 1
        return model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, logits_to_keep=keep).logits[:, :-1]
    ctx = model(input_ids=shared.ctx_ids, attention_mask=shared.ctx_attn, position_ids=shared.ctx_pos,
                use_cache=True, logits_to_keep=1)
    cache = returned_cache(ctx)
    cache.batch_select_indices(shared.row_ctx)      # indexing, so gradients from every row add up in the context
    out = model(input_ids=shared.tokens.input_ids, attention_mask=shared.attention_mask,
                position_ids=shared.position_ids, use_cache=True, **{CACHE: cache})
    return torch.cat([ctx.logits[shared.row_ctx], out.logits[:, :-1]], dim=1)              # [N, R, V]


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on: it drops the KV cache in training, so no shared contexts."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return bool(checkpointing)
