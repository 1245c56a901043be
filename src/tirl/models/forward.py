"""The policy forward of the RL update: per-token log-probs of a packed, padding-free micro-batch
(``packed_logprobs``, the default), or next-token logits lined up with a padded batch's per-token tensors, reading a
context shared by several rows once (``tirl.rl.batch.SharedContextBatch``) when the model allows it."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

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


# SDPA over packed rows, one causal call per sequence: transformers' own packed path (no mask, restarting
# position_ids) builds a [T, T] block-diagonal mask and attends over the whole pack, O(T^2) time and mask memory in the
# pack's length; this costs sum(len_i^2) like flash-attention's varlen kernel, which GPUs get from the same inputs.
PACKED_SDPA = "tirl_packed_sdpa"


def _packed_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_bounds=None, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] → [1, T, Hq, D]; ``packed_bounds``: sequence starts and the end
    (cumulative lengths, python ints). Without bounds (generation, other callers) it is transformers' SDPA."""
    if packed_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    out = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                          scale=scaling, enable_gqa=gqa)
           for s, e in zip(packed_bounds[:-1], packed_bounds[1:])]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None   # _packed_sdpa keeps attention causal inside each sequence itself


AttentionInterface.register(PACKED_SDPA, _packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, _no_mask)


@contextmanager
def _per_sequence_attention(model, packed: PackedBatch):
    """Forward kwargs that make an SDPA model attend sequence by sequence over the packed row (``_packed_sdpa``), or
    none (transformers' block-diagonal mask) for other attention kernels (flash: varlen already; eager: as asked),
    sliding-window layers, or activation checkpointing (its recompute in the backward would run outside this
    switch)."""
    cfg = model.config
    plain = cfg._attn_implementation == "sdpa" and not is_checkpointing(model) and \
        "sliding_attention" not in (getattr(cfg, "layer_types", None) or ()) and \
        not getattr(cfg, "use_sliding_window", False)
    if not plain:
        yield {}
        return
    lengths = torch.diff(packed.position_ids[0], append=packed.position_ids.new_zeros(1)) != 1    # True at a last
    ends = (lengths.nonzero().flatten() + 1).tolist()
    cfg._attn_implementation = PACKED_SDPA
    try:
        yield {"packed_bounds": [0, *ends]}
    finally:
        cfg._attn_implementation = "sdpa"


def packed_logprobs(model, packed: PackedBatch, temperature: float = 1.0,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [K] (and detached entropies [K] with ``with_entropy``) of the loss tokens of a packed micro-batch
    under softmax(logits / temperature), one forward over the [1, T] packed row.

    No attention mask and no cache are passed, so transformers reads the restarting ``position_ids`` as packed
    sequences (``masking_utils.find_packed_sequence_indices``: a block-diagonal causal mask for eager; the varlen
    kernel for flash-attention); an SDPA model attends sequence by sequence (``_per_sequence_attention``). Peak
    activations are those of one T-token row. With a plain lm_head the logits are made chunk by chunk from the K hidden states
    (``tirl.rl.core.linear_token_logprobs``: peak ≈ 2-3 × 64 MiB beyond the activations); else the model's own head
    runs on the K positions only (``logits_to_keep`` as indices: a [K, V] peak).
    """
    head = _chunkable_head(model)
    if packed.logit_pos.numel() == 0:
        # nothing to predict (a rank's zero-weighted pass over the empty batch): still run the model and keep the
        # result in its graph, so the backward reaches every parameter and every rank joins DDP's/FSDP's collectives
        logits = model(input_ids=packed.input_ids[:, :1], use_cache=False, logits_to_keep=1).logits
        zero = (logits.sum() * 0).float().expand(0)                                             # [0]
        return zero, (zero.detach() if with_entropy else None)
    with _per_sequence_attention(model, packed) as attn:
        if head is None:
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                           logits_to_keep=packed.logit_pos, **attn).logits[0]                       # [K, V]
        else:
            hidden = model.get_decoder()(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                         use_cache=False, **attn).last_hidden_state[0, packed.logit_pos]  # [K, H]
    if head is None:
        logp = core.token_logprobs(logits, packed.targets, temperature)
        ent = core.token_entropy(logits.detach(), temperature) if with_entropy else None
        return logp, ent
    return core.linear_token_logprobs(hidden, head.weight, packed.targets, temperature, with_entropy)


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on: it drops the KV cache in training, so no shared contexts."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return bool(checkpointing)
