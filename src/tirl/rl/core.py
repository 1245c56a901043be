"""Pure tensor math of RL for LMs: log-probs, entropies, advantages, policy loss, KL, loss aggregation.

Every function here is a function of tensors only (no model, no Lightning), in the style of verl's
`core_algos.py`. Choices made by name in config (KL estimator, loss aggregation, advantage scaling) go
through small registries whose `get_*` raises `UnknownChoiceError` listing the valid names.

Shapes: B sequences, T response positions, V vocabulary, N = num_groups * group_size samples.
`mask` is 1 (or True) on tokens that receive loss and 0 on prompt/tool-output/padding tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# Rows per chunk are chosen so one chunk holds about this many vocab entries (64 MiB in fp32): the
# per-chunk temporaries then stay far below the logits' own size even for a 152k vocabulary.
CHUNK_ELEMENTS = 1 << 24


class UnknownChoiceError(ValueError):
    """A name selected in config is not one of the registered choices."""


def _lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise UnknownChoiceError(f"Unknown {kind} {name!r}; choose one of {sorted(registry)}.")
    return registry[name]


# --------------------------------------------------------------------------- masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over mask=1 entries; masked-out entries may hold NaN/inf without leaking in."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over mask=1 entries (0 where nothing is kept, never NaN)."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


# --------------------------------------------------------------------------- chunked vocab math


def _row_blocks(logits: Tensor, rows: int) -> Iterator[tuple[int, Tensor]]:
    """Yield (first flat row index, [n, V] view) over logits[..., V] without copying.

    `logits[:, :-1]` of a [B, T+1, V] tensor cannot be viewed as [B*T, V]; then we walk the leading
    dimension instead of calling reshape, which would silently copy the whole tensor.
    """
    vocab = logits.shape[-1]
    try:
        flat = logits.view(-1, vocab)
    except RuntimeError:
        per_item = logits[0].numel() // vocab if logits.shape[0] else 0
        for i in range(logits.shape[0]):
            for start, block in _row_blocks(logits[i], rows):
                yield i * per_item + start, block
        return
    for start in range(0, flat.shape[0], rows):
        yield start, flat[start : start + rows]


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _math_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits


def _scaled(block: Tensor, temperature: float) -> Tensor:
    # Upcast per chunk: bf16 logits never get a full fp32 copy, yet the math runs in fp32.
    z = block.to(_math_dtype(block))
    return z / temperature if temperature != 1.0 else z


def _scaled_chunks(logits: Tensor, temperature: float) -> Iterator[tuple[slice, Tensor]]:
    """(flat rows, z = logits[rows] / T upcast to fp32) chunk by chunk; z may share memory with logits (never
    write into it)."""
    for start, block in _row_blocks(logits, _chunk_rows(logits.shape[-1])):
        yield slice(start, start + block.shape[0]), _scaled(block, temperature)


def _chunked_grad(logits: Tensor, temperature: float, dz_of: Callable[[slice, Tensor], Tensor]) -> Tensor:
    """d/dlogits [..., V] (logits' dtype) from the per-chunk gradient w.r.t. z = logits / T, ``dz_of(rows, z)``
    [n, V]: d/dlogits = d/dz / T."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad.view(-1, logits.shape[-1])
    for rows, z in _scaled_chunks(logits, temperature):
        dz = dz_of(rows, z)
        grad_rows[rows] = dz.div_(temperature) if temperature != 1.0 else dz
    return grad


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[ids], with an analytic backward that builds only the gradient itself."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        flat_ids = ids.reshape(-1)
        out = torch.empty(flat_ids.shape[0], dtype=_math_dtype(logits), device=logits.device)  # [N]
        lse = torch.empty_like(out)  # [N]
        for rows, z in _scaled_chunks(logits, temperature):  # z: [n, V] fp32
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(-1, flat_ids[rows, None]).squeeze(-1) - lse[rows]
        ctx.temperature = temperature
        ctx.save_for_backward(logits, flat_ids, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, flat_ids, lse = ctx.saved_tensors

        def dz_of(rows: slice, z: Tensor) -> Tensor:  # d/dz log p(id) = onehot(id) - softmax(z)
            g = grad_out[rows, None]  # [n, 1]
            dz = torch.sub(z, lse[rows, None]).exp_().mul_(-g)
            return dz.scatter_add_(-1, flat_ids[rows, None], g)

        return _chunked_grad(logits, ctx.temperature, dz_of), None, None


class _TokenEntropy(torch.autograd.Function):
    """Entropy of softmax(logits / T) per row, chunked, with an analytic backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        n_rows = logits.numel() // logits.shape[-1] if logits.shape[-1] else 0
        entropy = torch.empty(n_rows, dtype=_math_dtype(logits), device=logits.device)  # [N]
        lse = torch.empty_like(entropy)  # [N]
        for rows, z in _scaled_chunks(logits, temperature):
            lse[rows] = torch.logsumexp(z, dim=-1)
            p = torch.sub(z, lse[rows, None]).exp_()  # in place: one chunk-sized temporary
            # H = lse - sum p z  (= -sum p log p, since log p = z - lse)
            entropy[rows] = lse[rows] - p.mul_(z).sum(-1)
        ctx.save_for_backward(logits, lse, entropy)
        ctx.temperature = temperature
        return entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, lse, entropy = ctx.saved_tensors

        def dz_of(rows: slice, z: Tensor) -> Tensor:
            # dH/dz_j = -p_j (log p_j + H)
            log_p = z - lse[rows, None]  # [n, V]
            p = torch.exp(log_p)
            return log_p.add_(entropy[rows, None]).mul_(p).mul_(-grad_out[rows, None])

        return _chunked_grad(logits, ctx.temperature, dz_of), None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use 1.0 for the plain softmax.")


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(ids) under softmax(logits / temperature), fp32 (fp64 for fp64 logits), shaped like `ids`.

    logits: [B, T, V] or [N, V] (any float dtype); ids: [B, T] (or anything with B*T = N entries).
    Works chunk by chunk over rows: peak extra memory is a few 64 MiB chunks, never a second
    vocab-sized tensor; the backward allocates only the logits-sized gradient.
    """
    _check_temperature(temperature)
    n_rows = logits.numel() // logits.shape[-1] if logits.shape[-1] else 0
    if ids.numel() != n_rows:
        raise ValueError(f"ids has {ids.numel()} entries but logits {tuple(logits.shape)} has {n_rows} rows; "
                         "pass ids aligned with the logits (shifted by one for next-token prediction).")
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= logits.shape[-1]):
        raise ValueError(f"ids must lie in [0, {logits.shape[-1]}); replace ignore-index/padding ids "
                         "(e.g. -100) by the pad token id and exclude them with the mask instead.")
    return _TokenLogprobs.apply(logits, ids, float(temperature)).view(ids.shape)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, fp32 (fp64 for fp64), shaped logits.shape[:-1]."""
    _check_temperature(temperature)
    return _TokenEntropy.apply(logits, float(temperature)).view(logits.shape[:-1])


def _linear_chunk(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """z = (hidden @ weight.T) / T for one chunk of rows, upcast to fp32 (fp64 for fp64): [n, V]."""
    return _scaled(hidden @ weight.t(), temperature)


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / T)[ids] over chunks of rows; the logits of one chunk exist at a time and the
    backward recomputes them (the fused linear + log-softmax of Liger's and verl's chunked losses)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float, rows: int,
                with_entropy: bool):  # type: ignore[override]
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(n, dtype=dtype, device=hidden.device)                               # [K]
        lse = torch.empty_like(out)                                                           # [K]
        entropy = torch.empty_like(out) if with_entropy else out.new_empty(0)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            z = _linear_chunk(hidden[s:e], weight, temperature)                               # [n, V]
            lse[s:e] = torch.logsumexp(z, dim=-1)
            out[s:e] = z.gather(-1, ids[s:e, None]).squeeze(-1) - lse[s:e]
            if with_entropy:
                p = torch.sub(z, lse[s:e, None]).exp_()
                entropy[s:e] = lse[s:e] - p.mul_(z).sum(-1)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor):  # type: ignore[override]
        hidden, weight, ids, lse = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], rows):
            e = min(s + rows, hidden.shape[0])
            z = _linear_chunk(hidden[s:e], weight, t)
            g = grad_out[s:e, None].to(z.dtype)                                                # [n, 1]
            dz = torch.sub(z, lse[s:e, None]).exp_().mul_(-g).scatter_add_(-1, ids[s:e, None], g)  # d/dz log p(id)
            if t != 1.0:
                dz.div_(t)
            if need_h:   # in the weight's dtype, as autograd through a bf16 lm_head would (no fp32 weight copy)
                grad_h[s:e] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), hidden[s:e].to(dz.dtype))
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def linear_token_logprobs(hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, chunk_rows: int | None = None) -> tuple[Tensor, Tensor | None]:
    """log p(ids) and (detached, optional) entropies under softmax(hidden @ weight.T / temperature), from hidden states
    instead of logits: the lm_head runs chunk by chunk so the [K, V] logits never exist at once.

    hidden: [K, H] final hidden states of the K positions that need a prediction; weight: [V, H] (a bias-free lm_head;
    gradients flow to both); ids: [K] next tokens. Returns fp32 (fp64 for fp64 inputs) [K] log-probs and [K]
    entropies (None unless ``with_entropy``; no gradient).
    Peak memory beyond the inputs: forward 2·c·V and backward 3·c·V fp32 elements for c = ``chunk_rows`` (default
    ``CHUNK_ELEMENTS // V``: ≈ 64 MiB per [c, V] temporary, ≤ ~200 MiB in all, independent of K), plus an fp32
    [V, H] accumulator for the weight's gradient when the weight trains (not under LoRA); the unchunked path holds
    the K·V logits and, in the backward, their gradient.
    Raises ValueError for mismatched shapes, ids outside [0, V) or temperature <= 0.
    """
    _check_temperature(temperature)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or ids.shape != hidden.shape[:1]:
        raise ValueError(f"hidden [K, H] {tuple(hidden.shape)}, weight [V, H] {tuple(weight.shape)} and ids [K] "
                         f"{tuple(ids.shape)} do not line up; pass one hidden state and one target id per position.")
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ValueError(f"ids must lie in [0, {weight.shape[0]}); exclude padding with the mask instead.")
    rows = chunk_rows or _chunk_rows(weight.shape[0])
    logp, entropy = _LinearTokenLogprobs.apply(hidden, weight, ids, float(temperature), rows, with_entropy)
    return logp, (entropy if with_entropy else None)


# --------------------------------------------------------------------------- advantages


ADVANTAGE_SCALES = ("group", "batch", "none")


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}; flatten them group by group.")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}; "
                         "lay out N = num_groups * group_size samples group-contiguously.")


def zero_variance_mask(rewards: Tensor, group_size: int) -> Tensor:
    """Bool [N]: True for every sample whose group has identical rewards (incl. groups of one)."""
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)  # [num_groups, G]
    same = grouped.amax(-1) == grouped.amin(-1)  # exact, unlike std == 0 after rounding
    return same.repeat_interleave(group_size)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages [N]: (r - mean_G) / (std_G + eps), std unbiased.

    scale: "group" divides by the group std, "batch" by the std of all N rewards, "none" does not
    divide (Dr. GRPO). Zero-variance groups (and groups of one) get exactly 0, never NaN.
    """
    _check_groups(rewards, group_size)
    if scale not in ADVANTAGE_SCALES:
        raise UnknownChoiceError(f"Unknown advantage scale {scale!r}; choose one of {list(ADVANTAGE_SCALES)}.")
    r = rewards.float()
    if group_size == 1:  # a lone sample has nothing to be compared with
        return torch.zeros_like(r)
    grouped = r.view(-1, group_size)  # [num_groups, G]
    centred = (grouped - grouped.mean(-1, keepdim=True)).view(-1)  # [N]
    if scale == "group":
        std = grouped.std(-1, keepdim=True).nan_to_num(0.0).expand_as(grouped).reshape(-1)
        adv = centred / (std + eps)
    elif scale == "batch":
        adv = centred / (r.std().nan_to_num(0.0) + eps)
    else:
        adv = centred
    # The mean of equal floats need not round back to the same float; DA-GRPO tests for exact zeros.
    return adv.masked_fill(zero_variance_mask(rewards, group_size), 0.0)


def _per_token(values: Tensor, mask: Tensor, name: str) -> Tensor:
    """Broadcast per-sample [B] values to [B, T] (per-token [B, T] pass through)."""
    if values.shape == mask.shape:
        return values
    if values.dim() == 1 and mask.dim() == 2 and values.shape[0] == mask.shape[0]:
        return values[:, None].expand_as(mask)
    raise ValueError(f"{name} must be [B] or [B, T] matching mask {tuple(mask.shape)}, got {tuple(values.shape)}.")


def da_grpo_shape(advantages: Tensor, entropy: Tensor, mask: Tensor,
                  alpha: float = 0.1, delta: float = 0.5) -> Tensor:
    """D-CORE's DA-GRPO: response tokens with advantage exactly 0 get min(alpha * H, delta).

    advantages: [B] or [B, T]; entropy: [B, T] (of the rollout policy at the rollout temperature,
    detached here); mask: [B, T]. Nonzero advantages are kept; padding comes back as 0.
    """
    adv = _per_token(advantages, mask, "advantages").to(entropy.dtype)
    bonus = (alpha * entropy.detach()).clamp(max=delta)
    shaped = torch.where(adv == 0, bonus, adv)
    return torch.where(mask.bool(), shaped, torch.zeros_like(shaped))


# --------------------------------------------------------------------------- policy loss


def policy_loss(logp: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per token with asymmetric clip (DAPO) and optional dual clip (negative A).

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); with dual_clip c and A < 0 it is
    further capped at -A c. r = exp(logp - old_log_probs). A ratio exactly on a bound counts as unclipped.
    Returns (loss_tokens [B, T], zero on padding; detached scalar metrics over masked tokens).
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (the paper's value is 3), got {dual_clip}; or None to disable it.")
    keep = mask.bool()
    adv = _per_token(advantages, mask, "advantages").to(logp.dtype)
    # Padding may hold garbage log-probs; zero their log-ratio so no inf/NaN reaches the gradient.
    # The ±20 clamp is verl's guard against exp overflow on wildly stale tokens.
    log_ratio = torch.where(keep, logp - old_log_probs, torch.zeros_like(logp)).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.where(clipped > unclipped, clipped, unclipped)
    dual_hit = torch.zeros_like(keep)
    if dual_clip is not None:
        capped = -adv * dual_clip
        dual_hit = (adv < 0) & (capped < loss)
        loss = torch.where(dual_hit, capped, loss)
    loss = torch.where(keep, loss, torch.zeros_like(loss))

    with torch.no_grad():
        low_hit = (adv < 0) & (ratio < 1.0 - clip_low)
        high_hit = (adv > 0) & (ratio > 1.0 + clip_high)
        metrics = {
            "clipfrac_low": masked_mean(low_hit.float(), keep),
            "clipfrac_high": masked_mean(high_hit.float(), keep),
            "dual_clipfrac": masked_mean(dual_hit.float(), keep),
            # k3 estimate of KL(old || new) from samples of the old policy: r - 1 - log r.
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, keep),
            "ratio_mean": masked_mean(ratio, keep),
        }
    return loss, metrics


# --------------------------------------------------------------------------- KL penalty


def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    # Schulman's low-variance unbiased estimator; clamped as in verl so one outlier cannot dominate.
    log_ref_ratio = ref_logp - logp
    return (torch.exp(log_ref_ratio) - log_ref_ratio - 1.0).clamp(-10.0, 10.0)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
    "low_var_kl": _kl_k3,  # verl's name for k3
}


def get_kl_estimator(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    return _lookup(KL_ESTIMATORS, "KL estimator", name)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(policy || reference) estimate [B, T] from samples of the policy."""
    return get_kl_estimator(kind)(logp, ref_logp)


# --------------------------------------------------------------------------- aggregation


def _as_count(value: int | float | Tensor | None, local: Tensor) -> Tensor:
    if value is None:
        return local.clamp(min=1)
    return torch.as_tensor(value, dtype=local.dtype, device=local.device).clamp(min=1)


def _agg_token_mean(loss, mask, num_tokens=None, num_seqs=None, norm_len=None) -> Tensor:
    return masked_sum(loss, mask) / _as_count(num_tokens, mask.to(loss.dtype).sum())


def _seq_sums(loss: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lengths = mask.to(loss.dtype).sum(-1)  # [B]
    return masked_sum(loss, mask, dim=-1), lengths, lengths > 0


def _agg_seq_mean_token_mean(loss, mask, num_tokens=None, num_seqs=None, norm_len=None) -> Tensor:
    sums, lengths, has_tokens = _seq_sums(loss, mask)
    seq_means = sums / lengths.clamp(min=1)
    return seq_means.sum() / _as_count(num_seqs, has_tokens.to(loss.dtype).sum())


def _agg_seq_mean_token_sum_norm(loss, mask, num_tokens=None, num_seqs=None, norm_len=None) -> Tensor:
    sums, _, has_tokens = _seq_sums(loss, mask)
    # Dr. GRPO divides by a constant (the generation budget), not by each sequence's length.
    constant = mask.shape[-1] if norm_len is None else norm_len
    return (sums / constant).sum() / _as_count(num_seqs, has_tokens.to(loss.dtype).sum())


LOSS_AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "token-mean": _agg_token_mean,
    "seq-mean-token-mean": _agg_seq_mean_token_mean,
    "seq-mean-token-sum-norm": _agg_seq_mean_token_sum_norm,
}


def get_aggregation(name: str) -> Callable[..., Tensor]:
    return _lookup(LOSS_AGGREGATIONS, "loss aggregation", name)


def aggregate(loss: Tensor, mask: Tensor, mode: str = "token-mean",
              num_tokens: int | Tensor | None = None, num_seqs: int | Tensor | None = None,
              norm_len: int | None = None) -> Tensor:
    """Reduce per-token losses [B, T] to a scalar.

    token-mean: masked sum / num_tokens. seq-mean-token-mean: mean over sequences of each sequence's
    token mean. seq-mean-token-sum-norm (Dr. GRPO): mean over sequences of sum / norm_len (default T).
    Sequences count only if they have a loss token. Pass num_tokens / num_seqs as the counts of the
    WHOLE batch (all micro-batches and ranks) and a fixed norm_len: summing the micro-batch results
    then gives exactly the full-batch loss and gradient. Left as None they are the local counts.
    """
    return get_aggregation(mode)(loss, mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)


# --------------------------------------------------------------------------- auxiliary losses


def nll_on_positive(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token NLL -logp on response tokens with positive advantage, else 0 [B, T] (THOR's λ term)."""
    adv = _per_token(advantages, mask, "advantages")
    keep = mask.bool() & (adv > 0)
    return torch.where(keep, -logp, torch.zeros_like(logp))


def positive_token_count(advantages: Tensor, mask: Tensor) -> int:
    """Loss tokens with advantage > 0: the local share of the ``positive`` NLL normaliser (sum it over the
    mini-batch's micro-batches and ranks before dividing; see ``nll_positive_mean``)."""
    adv = _per_token(advantages, mask, "advantages")
    return int((mask.bool() & (adv > 0)).sum())


def nll_positive_mean(logp: Tensor, advantages: Tensor, mask: Tensor, num_positive: int | float | Tensor) -> Tensor:
    """THOR's NLL term as released: -sum of logp over positive-advantage loss tokens / ``num_positive``. Scalar.

    logp, mask: [B, T]; advantages: [B] or [B, T]. ``num_positive`` is the count of positive-advantage tokens over
    the WHOLE mini-batch (all micro-batches and ranks), so summing the micro-batch results gives the mini-batch's
    value exactly (THOR's actor divides per micro-batch instead, which makes it depend on the micro-batch size).
    Source: THOR's released verl fork, actor NLL loss on positive-advantage tokens (coefficient λ = 0.01 there).
    """
    return masked_sum(nll_on_positive(logp, advantages, mask), mask) / _as_count(num_positive, mask.to(logp.dtype).sum())


# --------------------------------------------------------------------------- rollout / trainer mismatch


def truncated_is_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Token-level truncated importance weights min(π_old / π_rollout, cap) [B, T], detached; 0 on padding.

    old_logp: the trainer's recomputed log-probs of the sampled tokens (``method.old_log_probs=recompute``);
    rollout_logp: the sampler's log-probs of the same tokens, as the sampler reports them. Both [B, T].
    Raises ValueError for cap <= 0. Source: "truncated importance sampling" for rollout/trainer mismatch
    (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; verl's
    ``tis_imp_ratio_cap``, TRL's ``vllm_importance_sampling_cap``). The log-ratio is clamped to ±20 as the
    policy loss's is, so a token the sampler gave ~0 mass cannot overflow (it is capped anyway).
    """
    if not cap > 0:
        raise ValueError(f"the truncated-IS cap must be > 0 (verl and TRL use 2), got {cap}.")
    keep = mask.bool()
    log_w = torch.where(keep, old_logp - rollout_logp, torch.zeros_like(old_logp)).detach().clamp(-20.0, 20.0)
    return torch.where(keep, log_w.exp().clamp(max=cap), torch.zeros_like(log_w))


def mismatch_kl_k3(trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(rollout ‖ trainer) from tokens the sampler drew: mean over mask of r - 1 - log r with
    r = π_trainer / π_rollout (Schulman's estimator; ≥ 0 per token, 0 when both agree). Scalar, detached."""
    keep = mask.bool()
    log_r = torch.where(keep, trainer_logp - rollout_logp, torch.zeros_like(trainer_logp)).detach().clamp(-20.0, 20.0)
    return masked_mean(log_r.exp() - 1.0 - log_r, keep)
