"""The policy forward of the RL update: per-token log-probs of a packed, padding-free micro-batch
(``packed_logprobs``, the default), or next-token logits lined up with a padded batch's per-token tensors, reading a
context shared by several rows once (``tirl.rl.batch.SharedContextBatch``) when the model allows it."""

from __future__ import annotations

import torch

from tirl.models.kv_cache import CACHE, returned_cache
from tirl.models.sharding import is_sharded
from tirl.rl import core
from tirl.rl.batch import PackedBatch, SharedContextBatch, TensorBatch


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


def _chunkable_head(model) -> torch.nn.Linear | None:
    """The model's lm_head when the log-probs can be computed from hidden states chunk by chunk: a plain bias-free
    ``nn.Linear`` (tied or not; a LoRA-wrapped head is not plain), no logit soft-capping/scaling, an unsharded
    model (an FSDP2 root's parameters are only whole inside its own forward)."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or is_sharded(model):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    return head


def packed_logprobs(model, packed: PackedBatch, temperature: float = 1.0,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [K] (and detached entropies [K] with ``with_entropy``) of the loss tokens of a packed micro-batch
    under softmax(logits / temperature), one forward over the [1, T] packed row.

    No attention mask and no cache are passed, so transformers reads the restarting ``position_ids`` as packed
    sequences (``masking_utils.find_packed_sequence_indices``: block-diagonal causal mask for SDPA/eager; the varlen
    kernel for flash-attention). With a plain lm_head the logits are made chunk by chunk from the K hidden states
    (``tirl.rl.core.linear_token_logprobs``: peak ≈ 2-3 × 64 MiB beyond the activations); else the model's own head
    runs on the K positions only (``logits_to_keep`` as indices: a [K, V] peak).
    """
    head = _chunkable_head(model)
    if packed.logit_pos.numel() == 0:   # nothing to predict; still run the model so every rank joins FSDP's gathers
        model(input_ids=packed.input_ids[:, :1], use_cache=False, logits_to_keep=1)
        zero = packed.targets.new_zeros(0, dtype=torch.float32)
        return zero, (zero if with_entropy else None)
    if head is None:
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                       logits_to_keep=packed.logit_pos).logits[0]                               # [K, V]
        logp = core.token_logprobs(logits, packed.targets, temperature)
        ent = core.token_entropy(logits.detach(), temperature) if with_entropy else None
        return logp, ent
    hidden = model.get_decoder()(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                 use_cache=False).last_hidden_state[0, packed.logit_pos]        # [K, H]
    return core.linear_token_logprobs(hidden, head.weight, packed.targets, temperature, with_entropy)


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on: it drops the KV cache in training, so no shared contexts."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return bool(checkpointing)
