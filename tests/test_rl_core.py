"""rl/core.py against hand-computed values and reference implementations (no model involved)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tirl.rl import core
from tirl.rl.core import (
    UnknownChoiceError,
    aggregate,
    da_grpo_shape,
    get_aggregation,
    get_kl_estimator,
    group_advantages,
    kl_penalty,
    masked_mean,
    nll_on_positive,
    policy_loss,
    token_entropy,
    token_logprobs,
    zero_variance_mask,
)

torch.set_num_threads(1)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Force several row chunks so chunk boundaries are exercised on small tensors."""
    monkeypatch.setattr(core, "CHUNK_ELEMENTS", 25)  # vocab 11 -> 2 rows per chunk


# --------------------------------------------------------------------------- token_logprobs / entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax_gather_and_its_gradient(tiny_chunks, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=gen)).requires_grad_(True)
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    upstream = torch.randn(2, 5, generator=gen)

    ours = token_logprobs(logits, ids, temperature)
    (ours * upstream).sum().backward()
    grad_ours = logits.grad.clone()
    logits.grad = None

    ref = F.log_softmax(logits / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    (ref * upstream).sum().backward()

    assert ours.shape == (2, 5) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, logits.grad, atol=1e-6, rtol=1e-5)


def test_token_logprobs_hand_value_and_gradcheck():
    # logits [0, ln 3] -> p = [1/4, 3/4]; at T = 2 the logits halve: p = [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)].
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    ids = torch.tensor([1])
    assert token_logprobs(logits, ids).item() == pytest.approx(math.log(0.75))
    assert token_logprobs(logits, ids, 2.0).item() == pytest.approx(math.log(3**0.5 / (1 + 3**0.5)))

    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (3, 4))
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, target, 0.8), (x,))


def test_token_logprobs_on_unviewable_slice_and_flat_logits(tiny_chunks):
    full = torch.randn(3, 6, 11, requires_grad=True)
    shifted = full[:, :-1]  # [3, 5, 11] that cannot be viewed as [15, 11]
    ids = torch.randint(0, 11, (3, 5))
    ref = F.log_softmax(shifted, -1).gather(-1, ids[..., None]).squeeze(-1)
    ours = token_logprobs(shifted, ids)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), full)[0], torch.autograd.grad(ref.sum(), full)[0])
    shifted = shifted.detach()
    flat = shifted.reshape(15, 11)
    torch.testing.assert_close(token_logprobs(flat, ids), ref)  # [N, V] logits, [B, T] ids -> [B, T]


def test_token_logprobs_bf16_runs_in_fp32():
    logits = (4 * torch.randn(2, 3, 50)).bfloat16().requires_grad_(True)
    ids = torch.randint(0, 50, (2, 3))
    ours = token_logprobs(logits, ids)
    ref = F.log_softmax(logits.detach().float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_token_logprobs_rejects_bad_inputs():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="-100"):
        token_logprobs(logits, torch.full((2, 3), -100))
    with pytest.raises(ValueError, match="rows"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_token_entropy_matches_reference_and_gradient(tiny_chunks, temperature):
    logits = (2 * torch.randn(2, 5, 11)).requires_grad_(True)
    upstream = torch.randn(2, 5)
    ours = token_entropy(logits, temperature)
    (ours * upstream).sum().backward()
    grad_ours = logits.grad.clone()
    logits.grad = None

    log_p = F.log_softmax(logits / temperature, -1)
    ref = -(log_p.exp() * log_p).sum(-1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, logits.grad, atol=1e-5, rtol=1e-5)


def test_token_entropy_hand_values_and_gradcheck():
    uniform = torch.zeros(1, 4, dtype=torch.float64)
    assert token_entropy(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[0.0, -1e4]], dtype=torch.float64)
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-12)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: token_entropy(t, 0.9), (x,))


# --------------------------------------------------------------------------- advantages


def test_group_advantages_unbiased_std_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # G=2: mean 0.5, unbiased std sqrt(0.5) -> ±0.5/0.7071 = ±0.7071
    s = 0.5 / math.sqrt(0.5)
    torch.testing.assert_close(group_advantages(rewards, 2, eps=0.0), torch.tensor([s, -s, -s, s]))
    # G=4: mean 0.5, unbiased std sqrt(1/3) -> ±0.8660
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.0), torch.tensor([s, -s, -s, s]))
    # eps sits in the denominator
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.1)[0], torch.tensor(0.5 / (math.sqrt(1 / 3) + 0.1)))


def test_dr_grpo_and_batch_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(group_advantages(rewards, 2, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # batch: centred [0.5, -0.5, 0, 0] over the std of [1, 0, 0, 0] (unbiased: 0.5)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, scale="batch", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_groups_of_one_and_equal_rewards_give_exact_zeros():
    for scale in core.ADVANTAGE_SCALES:
        assert torch.equal(group_advantages(torch.tensor([3.0, -1.0]), 1, scale=scale), torch.zeros(2))
        equal = group_advantages(torch.full((6,), 0.1), 3, scale=scale)
        assert torch.equal(equal, torch.zeros(6))  # exactly 0: DA-GRPO keys on it
    assert torch.equal(zero_variance_mask(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2),
                       torch.tensor([True, True, False, False]))
    assert zero_variance_mask(torch.tensor([2.0, 5.0]), 1).all()


def test_group_advantages_rejects_bad_layout_and_scale():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(UnknownChoiceError, match="'std'.*batch"):
        group_advantages(torch.zeros(4), 2, scale="std")


def test_da_grpo_shapes_only_zero_advantage_response_tokens():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, eps=0.0)  # [0, 0, -s, s]
    s = 0.5 / math.sqrt(0.5)
    entropy = torch.tensor([[1.0, 7.0, 3.0], [2.0, 0.0, 4.0], [9.0, 9.0, 9.0], [1.0, 1.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    shaped = da_grpo_shape(adv, entropy, mask, alpha=0.1, delta=0.5)
    expected = torch.tensor([
        [0.1, 0.5, 0.0],  # 0.1*7 capped at delta; padding stays 0
        [0.2, 0.0, 0.4],
        [-s, -s, 0.0],  # nonzero advantages untouched
        [s, 0.0, 0.0],
    ])
    torch.testing.assert_close(shaped, expected)
    assert not shaped.requires_grad  # entropy is detached

    per_token = torch.tensor([[0.0, 0.3, 0.0]])
    out = da_grpo_shape(per_token, torch.tensor([[2.0, 2.0, 2.0]]), torch.tensor([[1, 1, 1]]), alpha=1.0, delta=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.3, 0.5]]))


# --------------------------------------------------------------------------- policy loss


def _loss_and_grad(logp_value: float, adv: float, **kwargs):
    logp = torch.tensor([[logp_value]], dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                                torch.ones(1, 1), **kwargs)
    loss.sum().backward()
    return loss.item(), logp.grad.item(), metrics


def _ratio(logp_value: float) -> float:
    return torch.exp(torch.tensor(logp_value, dtype=torch.float64)).item()


def test_asymmetric_clip_at_and_just_past_the_bounds():
    # Build eps from the ratio the function will compute, so "at the bound" is exact in fp64.
    at_high = math.log(1.28)
    r = _ratio(at_high)
    loss, grad, m = _loss_and_grad(at_high, 1.0, clip_low=0.2, clip_high=r - 1.0)
    assert (loss, grad) == (-r, -r) and m["clipfrac_high"] == 0  # on the bound: still unclipped
    loss, grad, m = _loss_and_grad(at_high + 1e-9, 1.0, clip_low=0.2, clip_high=r - 1.0)
    assert loss == pytest.approx(-1.28) and grad == 0.0 and m["clipfrac_high"] == 1

    at_low = math.log(0.8)
    r = _ratio(at_low)
    loss, grad, m = _loss_and_grad(at_low, -1.0, clip_low=1.0 - r, clip_high=0.28)
    assert (loss, grad) == (r, r) and m["clipfrac_low"] == 0
    loss, grad, m = _loss_and_grad(at_low - 1e-9, -1.0, clip_low=1.0 - r, clip_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["clipfrac_low"] == 1

    # PPO never clips the side that makes a good action less likely (A>0, r<1-eps) or vice versa.
    loss, grad, m = _loss_and_grad(math.log(0.5), 2.0)
    assert loss == pytest.approx(-1.0) and grad == pytest.approx(-1.0) and m["clipfrac_low"] == 0
    loss, grad, _ = _loss_and_grad(math.log(2.0), -1.0)
    assert loss == pytest.approx(2.0) and grad == pytest.approx(2.0)


def test_dual_clip_caps_negative_advantages_only():
    at_c = math.log(3.0)
    c = _ratio(at_c)
    loss, grad, m = _loss_and_grad(at_c, -2.0, dual_clip=c)
    assert (loss, grad) == (2 * c, 2 * c) and m["dual_clipfrac"] == 0
    loss, grad, m = _loss_and_grad(at_c + 1e-9, -2.0, dual_clip=c)
    assert loss == 2 * c and grad == 0.0 and m["dual_clipfrac"] == 1
    # positive advantage far past c: ordinary high clip, no dual clip
    loss, grad, m = _loss_and_grad(math.log(5.0), 1.0, dual_clip=3.0)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and m["dual_clipfrac"] == 0
    with pytest.raises(ValueError, match="dual_clip"):
        _loss_and_grad(0.0, 1.0, dual_clip=0.5)


def test_policy_loss_metrics_ignore_padding_and_garbage_there():
    old = torch.zeros(1, 5, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 4.0, 1.0]], dtype=torch.float64))
    logp[0, 4] = float("nan")  # padding may hold anything
    logp.requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, m = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.28, 0.8, 3.0, 0.0]], dtype=torch.float64))
    aggregate(loss, mask).backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 4] == 0
    assert m["clipfrac_high"].item() == 0.25 and m["clipfrac_low"].item() == 0.25
    assert m["dual_clipfrac"].item() == 0.25 and not m["approx_kl"].requires_grad
    # k3 of old vs new over the 4 kept tokens: r - 1 - log r
    k3 = [r - 1 - math.log(r) for r in (1.0, 1.5, 0.5, 4.0)]
    assert m["approx_kl"].item() == pytest.approx(sum(k3) / 4)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values_and_clamp():
    logp = torch.tensor([[0.0, -1.0]])
    ref = torch.tensor([[-1.0, 0.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.5, 0.5]]))
    k3 = torch.tensor([[math.exp(-1.0), math.exp(1.0) - 2.0]])  # e^d - d - 1, d = ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3)
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), k3)
    big = kl_penalty(torch.tensor([0.0]), torch.tensor([5.0]), "k3")  # e^5 - 6 = 142.4 -> 10
    assert big.item() == 10.0


def test_registries_name_the_unknown_choice_and_the_valid_ones():
    with pytest.raises(UnknownChoiceError, match=r"'k4'.*'k1', 'k2', 'k3'"):
        get_kl_estimator("k4")
    with pytest.raises(ValueError, match=r"'token-sum'.*'seq-mean-token-mean'"):
        get_aggregation("token-sum")
    with pytest.raises(UnknownChoiceError):
        kl_penalty(torch.zeros(1), torch.zeros(1), kind="kl")


# --------------------------------------------------------------------------- aggregation


def test_aggregate_hand_values_ignore_padding_and_empty_rows():
    nan = float("nan")
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, nan, nan], [nan, nan, nan]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=10).item() == pytest.approx((0.6 + 0.4) / 2)
    assert aggregate(loss, torch.zeros_like(mask), "token-mean").item() == 0.0


@pytest.mark.parametrize("mode", list(core.LOSS_AGGREGATIONS))
def test_micro_batches_with_global_counts_reproduce_full_batch_loss_and_gradient(mode):
    gen = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(4, 5, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    def loss_of(rows: slice, **counts) -> torch.Tensor:
        tokens, _ = policy_loss(logp[rows], old[rows], adv[rows], mask[rows])
        return aggregate(tokens, mask[rows], mode, norm_len=5, **counts)

    full = loss_of(slice(0, 4))
    (full_grad,) = torch.autograd.grad(full, logp)

    num_tokens, num_seqs = int(mask.sum()), int(mask.any(-1).sum())   # the global counts
    halves = [loss_of(slice(0, 2), num_tokens=num_tokens, num_seqs=num_seqs),
              loss_of(slice(2, 4), num_tokens=num_tokens, num_seqs=num_seqs)]
    (split_grad,) = torch.autograd.grad(sum(halves), logp)
    torch.testing.assert_close(sum(halves), full)
    torch.testing.assert_close(split_grad, full_grad)

    if mode == "token-mean":  # with local counts the micro-batches are weighted wrongly (4 vs 7 tokens)
        local = loss_of(slice(0, 2)) + loss_of(slice(2, 4))
        assert not torch.allclose(local, full)


# --------------------------------------------------------------------------- NLL and masked helpers


def test_nll_on_positive_advantage_tokens_only():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
    mask = torch.tensor([[1, 0], [1, 1], [1, 1]])
    out = nll_on_positive(logp, torch.tensor([1.0, -1.0, 0.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    per_token = nll_on_positive(logp[:1], torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 1]]))
    torch.testing.assert_close(per_token, torch.tensor([[1.0, 2.0]]))


def test_masked_mean_ignores_masked_out_entries():
    x = torch.tensor([[1.0, 3.0, float("inf")]])
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mean(x, mask).item() == 2.0
