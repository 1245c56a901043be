"""Padding-free RL updates and token-budget micro-batches (issue 21).

The packed path (``method.packing``) reads a micro-batch as one row whose positions restart per sequence; transformers
keeps attention inside each sequence from the positions alone. It must give the padded path's per-token log-probs
(1e-5), loss and gradients — lengths mixed, tool tokens (mask zeros) inside responses, THOR step-level rows, a KL
reference pass, LoRA — and the same recomputed old log-probs. Token-budget micro-batches must leave the mini-batch's
gradient unchanged, respect the budget and balance tokens. Pure math first, then the tiny model.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch
from test_update_schedule import (
    full_batch as loss_and_grads,  # the whole batch's loss and gradient in one pass
)

from tirl.config.schema import LoraConfig, LossConfig, MethodConfig, ModelConfig, RolloutConfig, SandboxConfig
from tirl.models.forward import packed_logprobs
from tirl.models.reference import make_frozen_reference
from tirl.models.tiny import build_tiny, load_tiny_tokenizer
from tirl.modules.grpo import GRPOModule
from tirl.rl import core
from tirl.rl.batch import Sample, collate_samples, pack_rows
from tirl.rl.schedule import plan_round, token_micro_batches

# --------------------------------------------------------------------------- pure: chunked lm_head math


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_linear_logprobs_and_entropy_equal_the_unchunked_ones_with_gradients(temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)     # K=11 positions, H=8
    weight = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)     # V=37
    ids = torch.randint(0, 37, (11,), generator=g)
    upstream = torch.randn(11, generator=g, dtype=torch.float64)
    logits = hidden @ weight.t()
    want = core.token_logprobs(logits, ids, temperature)
    want_ent = core.token_entropy(logits, temperature)
    (want * upstream).sum().backward()
    want_gh, want_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    for rows in (1, 4, 11, 64):          # one row per chunk, ragged last chunk, exactly one chunk, more than K
        got, ent = core.linear_token_logprobs(hidden, weight, ids, temperature, with_entropy=True, chunk_rows=rows)
        (got * upstream).sum().backward()
        assert torch.allclose(got, want, atol=1e-12) and torch.allclose(ent, want_ent, atol=1e-12)
        assert torch.allclose(hidden.grad, want_gh, atol=1e-12) and torch.allclose(weight.grad, want_gw, atol=1e-12)
        assert not ent.requires_grad
        hidden.grad = weight.grad = None
    # by hand: two tokens, uniform logits over V=4 → log(1/4) each, entropy log 4
    lp, h = core.linear_token_logprobs(torch.zeros(2, 3), torch.ones(4, 3), torch.tensor([0, 3]), with_entropy=True)
    assert torch.allclose(lp, torch.full((2,), -1.3862944)) and torch.allclose(h, torch.full((2,), 1.3862944))
    with pytest.raises(ValueError, match="ids must lie in"):
        core.linear_token_logprobs(torch.zeros(1, 3), torch.ones(4, 3), torch.tensor([4]))
    with pytest.raises(ValueError, match="do not line up"):
        core.linear_token_logprobs(torch.zeros(2, 3), torch.ones(4, 2), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- pure: token-budget planner


def test_token_micro_batches_by_hand():
    # 20 > 16 gets a micro-batch alone; the rest (37 tokens) fits in 3 balanced ones: 12+1, 9+3, 7+5
    assert token_micro_batches([5, 3, 9, 12, 1, 20, 7], 16) == [[5], [3, 4], [0, 6], [1, 2]]
    # four 10s under 25: two micro-batches of 20 (none of 30)
    assert token_micro_batches([10, 10, 10, 10], 25) == [[0, 2], [1, 3]]   # LPT deals longest-first, alternating
    assert token_micro_batches([], 8) == []
    with pytest.raises(ValueError, match="budget must be >= 1"):
        token_micro_batches([3], 0)


def test_round_plan_then_token_micro_batches_cover_each_row_once_keep_groups_and_respect_the_budget():
    rng = random.Random(0)
    for trial in range(200):
        n_groups, budget = rng.randint(1, 6), rng.choice([16, 64, 200])
        keys = [g for g in range(n_groups) for _ in range(rng.randint(1, 4))]
        lengths = [max(1, int(rng.paretovariate(1.2) * 8)) for _ in keys]        # long-tailed, some > budget
        plan = plan_round(keys, num_mini_batches=rng.randint(1, 3), ppo_epochs=1, seed=trial)
        seen = []
        for rows in plan:
            assert all(keys.count(k) == sum(keys[r] == k for r in rows) for k in {keys[r] for r in rows})  # whole
            mbs = token_micro_batches([lengths[r] for r in rows], budget)
            seen += [rows[i] for mb in mbs for i in mb]
            loads = [sum(lengths[rows[i]] for i in mb) for mb in mbs]
            for mb, load in zip(mbs, loads):
                assert load <= budget or len(mb) == 1, (trial, mb, load)       # over budget only alone
            fitting = [load for mb, load in zip(mbs, loads) if load <= budget]
            small = sum(lengths[rows[i]] for i in range(len(rows)) if lengths[rows[i]] <= budget)
            assert len(fitting) <= max(1, 2 * -(-small // budget))             # no more than twice the ideal count
            if len(fitting) > 1:   # balanced: the fullest and the emptiest differ by less than the budget's half...
                assert max(fitting) - min(fitting) <= max(budget // 2, max(lengths[r] for r in rows if
                                                                            lengths[r] <= budget)), (trial, loads)
        assert sorted(seen) == list(range(len(keys)))                         # every row exactly once


# --------------------------------------------------------------------------- the forward: packed = separate


def mixed_batch(seed: int = 1):
    """Five rows of mixed lengths; the longer responses hold a 2-token tool output (mask 0) inside; row 3 has a
    1-token response, row 4 is a step-level row."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (c, r) in enumerate([(5, 7), (5, 3), (9, 12), (3, 1), (6, 20)]):
        ctx = torch.randint(10, 1000, (c,), generator=g).tolist()
        resp = torch.randint(10, 1000, (r,), generator=g).tolist()
        mask = [0 if r > 4 and k in (2, 3) else 1 for k in range(r)]
        old = (-3.0 - torch.rand(r, generator=g)).tolist()
        samples.append(Sample(ctx, resp, mask, old, [0.0] * r, (-1.0) ** i * (1 + i / 4),
                              "step" if i == 4 else "episode", group=i // 2))
    return samples


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logprobs_equal_each_sequence_read_alone(impl):
    model, _ = build_tiny(seed=0)
    model.config._attn_implementation = impl
    samples = mixed_batch()
    tb = collate_samples(samples, 0)
    packed = pack_rows(tb)
    assert packed.input_ids.shape == (1, int(tb.attention_mask.sum()))           # no padding at all
    assert packed.logit_pos.numel() == int(tb.response_mask.sum())               # logits for loss tokens only
    with torch.no_grad():
        logp, ent = packed_logprobs(model, packed, 0.7, with_entropy=True)
        got, got_ent = packed.unpack(logp, tb.response_mask), packed.unpack(ent, tb.response_mask)
        for i, s in enumerate(samples):
            ids = torch.tensor([s.context + s.response])
            logits = model(input_ids=ids).logits[0, len(s.context) - 1:-1]           # the row alone, no padding
            want = core.token_logprobs(logits, torch.tensor(s.response), 0.7)
            want_ent = core.token_entropy(logits, 0.7)
            cols = slice(len(s.context) - 1, len(s.context) - 1 + len(s.response))
            m = torch.tensor(s.response_mask, dtype=torch.bool)
            assert (got[i, cols][m] - want[m]).abs().max() < 1e-5, (impl, i)
            assert (got_ent[i, cols][m] - want_ent[m]).abs().max() < 1e-5, (impl, i)
            assert (got[i, cols][~m] == 0).all()
        # the check can tell: positions that do not restart (one long sequence) let rows attend to each other
        leaky = copy.copy(packed)
        leaky.position_ids = torch.arange(packed.input_ids.shape[1])[None]
        assert (packed.unpack(packed_logprobs(model, leaky, 0.7)[0], tb.response_mask) - got).abs().max() > 1e-2


# --------------------------------------------------------------------------- the module: packed = padded


def make_module(lora: bool = False, **method_kw) -> GRPOModule:
    method = MethodConfig(**{"lr": 1e-2, "micro_batch_size": 8, "group_size": 2, "max_grad_norm": 1e6, **method_kw})
    model = ModelConfig(name_or_path="tiny", lora=LoraConfig(enabled=lora, r=4, alpha=8))
    module = GRPOModule(method, model, RolloutConfig(max_new_tokens=16, max_total_tokens=64, temperature=0.8),
                        SandboxConfig(workers=1), load_tiny_tokenizer())
    module.configure_model()
    module.frozen_ref = make_frozen_reference(module.policy, method.loss.kl_coef)
    # move the trained weights (LoRA's B starts at 0) so the policy differs from the reference: a real KL term
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0)
    return module



LOSSES = {
    "kl_nll_tokens": LossConfig(kl_coef=0.1, kl_kind="k3", nll_coef=0.5, nll_norm="tokens"),
    "seq_mean_positive_nll": LossConfig(agg="seq-mean-token-mean", nll_coef=0.5, nll_norm="positive", clip_high=0.28),
}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_packed_loss_and_gradients_equal_the_padded_ones(lora, loss, monkeypatch):
    monkeypatch.setattr(core, "CHUNK_ELEMENTS", 1024 * 5)   # the tiny vocab in chunks of 5 rows: the chunked path
    padded = make_module(lora, packing=False, loss=LOSSES[loss])
    packed = make_module(lora, packing=True, loss=LOSSES[loss])
    packed.policy.load_state_dict(padded.policy.state_dict())      # LoRA's A is drawn from the global RNG
    tb = collate_samples(mixed_batch(), 0)
    for share in (True, False):              # padded: the shared-context and the plain response-window forward
        padded.share_contexts = share
        want_loss, want = loss_and_grads(padded, tb)
        got_loss, got = loss_and_grads(packed, tb)
        assert got_loss == pytest.approx(want_loss, abs=1e-5)
        assert len(got) == len(want) and len(got) > 0
        for a, b in zip(got, want):
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7
    # the comparison can fail: a different temperature moves the loss
    packed.rollout_cfg.temperature = 1.0
    assert abs(loss_and_grads(packed, tb)[0] - want_loss) > 1e-4


def test_packed_with_activation_checkpointing_keeps_the_padded_gradient():
    """Checkpointing recomputes each layer in the backward, outside the per-sequence attention switch: packing then
    uses transformers' block-diagonal mask, and the gradient is still the padded one."""
    padded = make_module(packing=False, loss=LOSSES["kl_nll_tokens"])
    packed = make_module(packing=True, loss=LOSSES["kl_nll_tokens"])
    packed.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed.policy.train()
    tb = collate_samples(mixed_batch(), 0)
    want_loss, want = loss_and_grads(padded, tb)
    got_loss, got = loss_and_grads(packed, tb)
    assert got_loss == pytest.approx(want_loss, abs=1e-5)
    for a, b in zip(got, want):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7


def test_recomputed_old_log_probs_and_entropies_packed_equal_padded():
    padded = make_module(packing=False, old_log_probs="recompute", micro_batch_size=2)
    packed = make_module(packing=True, old_log_probs="recompute", micro_batch_tokens=40)
    for module in (padded, packed):
        module._all_reduce = lambda value, op="sum": value
    tb = collate_samples(mixed_batch(), 0)
    want_lp, want_ent = padded.recompute_old_log_probs(tb)
    got_lp, got_ent = packed.recompute_old_log_probs(tb)
    m = tb.response_mask.bool()
    assert (got_lp - want_lp)[m].abs().max() < 1e-5 and (got_ent - want_ent)[m].abs().max() < 1e-5
    assert torch.equal(got_lp[~m], tb.old_log_probs[~m]) and torch.equal(got_ent[~m], tb.entropy[~m])  # kept
    assert (got_lp - tb.old_log_probs)[m].abs().min() > 0                  # every loss token was rewritten


def test_packing_reads_a_shared_prompt_once_only_where_that_reads_fewer_tokens():
    module = make_module(packing=True)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 1000, (40,), generator=g).tolist()

    def group(lengths):
        return collate_samples([Sample(prompt, torch.randint(10, 1000, (n,), generator=g).tolist(), [1] * n,
                                       [-3.0] * n, [0.0] * n, 1.0) for n in lengths], 0)

    even = group([4, 5, 4, 5])        # packed 4·40 + 18 = 178 tokens; shared 40 + 4·5 = 60: the shared pass
    packed, shared = module.micro_batch_reading(even)
    assert packed is None and shared is not None and shared.tokens_read() == 60
    tailed = group([4, 5, 4, 120])    # packed 293; shared 40 + 4·120 = 520: packed
    packed, shared = module.micro_batch_reading(tailed)
    assert shared is None and packed.input_ids.shape == (1, 293)
    module.share_contexts = False     # (as with gradient checkpointing: no cache to share) always packed
    assert module.micro_batch_reading(even)[0] is not None
    module.method_cfg.packing = False
    assert module.micro_batch_reading(tailed)[0] is None


# --------------------------------------------------------------------------- token-budget micro-batches


def attach(module: GRPOModule, recorder: list):
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.0)
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: None
    module.optimizer_step_and_schedule = lambda o: recorder.append(
        [p.grad.detach().clone() for p in module.trainable_parameters()])
    module._all_reduce = lambda value, op="sum": value
    module.manual_backward = lambda loss: loss.backward()
    return opt


@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_micro_batches_give_the_full_batch_gradient_within_the_budget(packing):
    budget = 30
    module = make_module(packing=packing, micro_batch_tokens=budget,
                         loss=LossConfig(kl_coef=0.1, nll_coef=0.5, nll_norm="positive"))
    ref = copy.deepcopy(module)
    tb = collate_samples(mixed_batch(), 0)
    want_loss, want = loss_and_grads(ref, tb)
    seen: list = []
    original = module.micro_batch_loss
    module.micro_batch_loss = lambda mb, counts: (seen.append(mb), original(mb, counts))[1]
    grads: list = []
    attach(module, grads)
    out = module.mini_batch_step(tb, list(range(len(tb))), module.optimizers())
    tokens = [int(mb.attention_mask.sum()) for mb in seen]
    lengths = tb.attention_mask.sum(-1).tolist()
    assert sum(len(mb) for mb in seen) == len(tb) and len(seen) > 2               # several micro-batches
    assert all(t <= budget or len(mb) == 1 for t, mb in zip(tokens, seen))        # the 26-token row fits; all do
    assert max(lengths) <= budget and max(tokens) - min(tokens) <= max(lengths)   # balanced (LPT)
    assert out["loss"] == pytest.approx(want_loss, abs=1e-5)
    for a, b in zip(grads[0], want):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7


# --------------------------------------------------------------------------- config


def test_bad_packing_keys_fail_at_start_in_one_sentence(train_cfg):
    from tirl.config import CONFIG_DIR, ConfigError, check_overrides, validate

    with pytest.raises(ConfigError, match=r"^Config key 'method.micro_batch_tokens' is 0; it must be at least 1\.$"):
        validate(train_cfg("method.micro_batch_tokens=0"))
    with pytest.raises(ConfigError, match="did you mean 'micro_batch_tokens'"):
        check_overrides(["method.micro_batch_tokenz=512"], CONFIG_DIR, "train")


def test_packing_keys_compose_with_their_defaults(train_cfg):
    from tirl.config import validate

    cfg = train_cfg("method.micro_batch_tokens=4096")
    validate(cfg)
    assert cfg.method.packing is True and cfg.method.micro_batch_tokens == 4096
