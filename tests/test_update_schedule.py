"""The papers' update schedule (issue 18): a rollout round split into mini-batches of whole groups, each one
optimizer step; old log-probs recomputed by the trainer; rollout/trainer mismatch corrected by truncated IS;
THOR's NLL normalised by the positive-advantage tokens. Pure math first, then the module on the tiny model."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tirl.config.schema import (
    LossConfig,
    MethodConfig,
    ModelConfig,
    RolloutConfig,
    RolloutCorrectionConfig,
    SandboxConfig,
    ShapingConfig,
)
from tirl.models.tiny import load_tiny_tokenizer
from tirl.modules.grpo import GRPOModule
from tirl.rl import core
from tirl.rl.batch import Sample, collate_samples
from tirl.rl.schedule import ScheduleError, check_world_size, plan_round, steps_per_round

# --------------------------------------------------------------------------- pure: schedule


def test_plan_keeps_groups_whole_covers_every_row_once_per_epoch_and_reshuffles():
    keys = [("episode", g) for g in range(6) for _ in range(2)] + [("step", 0)] * 3     # 6 groups of 2, 1 of 3
    plan = plan_round(keys, num_mini_batches=3, ppo_epochs=2, seed=7, round_index=5)
    assert len(plan) == 6
    for epoch in range(2):
        steps = plan[epoch * 3:(epoch + 1) * 3]
        assert sorted(r for rows in steps for r in rows) == list(range(len(keys)))    # every row, once
        for rows in steps:
            groups = {keys[r] for r in rows}
            assert all(sum(keys[r] == g for r in rows) == keys.count(g) for g in groups)   # whole groups only
        assert sorted(len({keys[r] for r in rows}) for rows in steps) == [2, 2, 3]   # 7 groups: 3/2/2
    assert plan[:3] != plan[3:]                                                       # a fresh shuffle per epoch
    assert plan == plan_round(keys, 3, 2, seed=7, round_index=5)                      # a pure function
    assert plan != plan_round(keys, 3, 2, seed=7, round_index=6)                      # ... of the round
    assert plan != plan_round(keys, 3, 2, seed=8, round_index=5)                      # ... and the seed


def test_one_mini_batch_is_the_round_in_order_and_fewer_groups_than_steps_leave_empty_steps():
    keys = [0, 0, 1, 1]
    assert plan_round(keys, 1, 2, seed=3, round_index=9) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    plan = plan_round(keys, 4, 1)
    assert sorted(map(len, plan)) == [0, 0, 2, 2]          # a rank whose filter kept 2 groups still takes 4 steps


def test_steps_per_round_and_divisibility_errors_are_one_sentence():
    assert steps_per_round(32, 8, 1) == 4 and steps_per_round(5120, 128, 1) == 40 and steps_per_round(8, None, 2) == 2
    with pytest.raises(ScheduleError, match=r"rollout_batch_size=32 must be a multiple of method.mini_batch_size=7"):
        steps_per_round(32, 7, 1)
    with pytest.raises(ScheduleError, match=r"multiple of the 3 training processes"):
        check_world_size(8, None, 3)
    with pytest.raises(ScheduleError, match=r"mini_batch_size=2 .* multiple of the 4 training processes"):
        check_world_size(8, 2, 4)
    check_world_size(8, 4, 4)


# --------------------------------------------------------------------------- pure: core math


def test_truncated_is_weights_and_mismatch_kl_by_hand():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.2), 0.0]])
    rollout = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.4), 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = core.truncated_is_weights(old, rollout, mask, cap=2.0)
    # ratios 1, 3 (capped at 2), 0.5; padding 0
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 0.5, 0.0]]), atol=1e-6)
    # k3 of KL(rollout || trainer): r - 1 - log r with r = 1, 3, 0.5, averaged over 3 tokens
    want = (0.0 + (3 - 1 - math.log(3)) + (0.5 - 1 - math.log(0.5))) / 3
    assert core.mismatch_kl_k3(old, rollout, mask).item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="cap must be > 0"):
        core.truncated_is_weights(old, rollout, mask, cap=0.0)


def test_positive_nll_divides_by_the_positive_tokens_of_the_whole_mini_batch():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # positive-advantage loss tokens: -1 and -2 → NLL 3 over 2 tokens
    assert core.positive_token_count(adv, mask) == 2
    assert core.nll_positive_mean(logp, adv, mask, 2).item() == pytest.approx(1.5)
    # split into micro-batches with the global count: the parts add up to the whole
    parts = [core.nll_positive_mean(logp[i:i + 1], adv[i:i + 1], mask[i:i + 1], 2).item() for i in range(2)]
    assert sum(parts) == pytest.approx(1.5)
    # the "tokens" normaliser (tirl's old one) divides by all 4 loss tokens instead: 0.75
    assert core.masked_sum(core.nll_on_positive(logp, adv, mask), mask).item() / 4 == pytest.approx(0.75)


def test_clip_low_clip_high_and_dual_clip_engage_with_the_hand_computed_loss():
    """THOR's bounds 0.2 / 0.28, dual clip 3. Token: (ratio, A) → loss by hand."""
    ratio = torch.tensor([[1.5, 0.5, 5.0, 1.1, 0.7]])
    adv = torch.tensor([[1.0, -1.0, -2.0, 1.0, 1.0]])
    old = torch.zeros_like(ratio)
    logp = ratio.log()
    loss, m = core.policy_loss(logp, old, adv, torch.ones_like(ratio), 0.2, 0.28, dual_clip=3.0)
    want = [
        -1.28,          # A>0, r=1.5 > 1.28: clip-high → -A·1.28
        0.8,            # A<0, r=0.5 < 0.8: clip-low → max(0.5, 0.8)·1 = 0.8
        6.0,            # A<0, r=5: -A·r = 10 → dual clip caps it at -A·3 = 6
        -1.1,           # inside the bounds: -A·r
        -0.7,           # A>0, r<0.8: PPO does not clip that side: -A·r
    ]
    assert loss[0].tolist() == pytest.approx(want, abs=1e-6)
    assert m["clipfrac_high"].item() == pytest.approx(1 / 5)
    assert m["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert m["dual_clipfrac"].item() == pytest.approx(1 / 5)


# --------------------------------------------------------------------------- the module on the tiny model


PROMPTS = ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nanother one<|im_end|>\n"]


def make_module(**method_kw) -> GRPOModule:
    method = MethodConfig(**{"lr": 1e-2, "micro_batch_size": 8, "group_size": 2, "max_grad_norm": 1e6, **method_kw})
    module = GRPOModule(method, ModelConfig(name_or_path="tiny"), RolloutConfig(max_new_tokens=16, max_total_tokens=32),
                        SandboxConfig(workers=1), load_tiny_tokenizer())
    module.configure_model()
    return module


def round_samples(module: GRPOModule, n_groups: int, seed: int = 0, off_policy: float = 0.0) -> list[Sample]:
    """``n_groups`` groups of 2 random responses (advantages -1/+1 scaled per group); old log-probs = the policy's
    own, shifted by ``off_policy`` (a sampler that disagrees with the trainer)."""
    tok = module.tokenizer
    g = torch.Generator().manual_seed(seed)
    samples = []
    for gi in range(n_groups):
        prompt = tok.encode(PROMPTS[gi % 2])
        for j in range(2):
            resp = torch.randint(10, 500, (4 + (3 * gi + j) % 5,), generator=g).tolist()
            with torch.no_grad():
                logits = module.policy(input_ids=torch.tensor([prompt + resp])).logits[0, len(prompt) - 1:-1]
                old = core.token_logprobs(logits, torch.tensor(resp))
            old = old + off_policy * torch.randn(old.shape, generator=g)
            adv = (1.0 if j else -1.0) * (1 + gi / 4)
            samples.append(Sample(prompt, resp, [1] * len(resp), old.tolist(), [0.0] * len(resp), adv, group=gi))
    return samples


def attach(module: GRPOModule, opt, recorder: list | None = None):
    """Run ``update`` outside a Trainer: one process, this optimizer, no schedule; record each step's gradient."""
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0)
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()

    def step(o):
        if recorder is not None:
            recorder.append([p.grad.detach().clone() for p in module.trainable_parameters()])
        o.step()

    module.optimizer_step_and_schedule = step


def full_batch(module: GRPOModule, tb):
    counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}
    counts["positive"] = (module.global_positive_tokens(tb), 0.0)
    module.policy.zero_grad(set_to_none=True)
    loss, _ = module.micro_batch_loss(tb, counts)
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in module.trainable_parameters()]


def test_default_schedule_is_one_full_batch_step():
    """mini_batch_size = rollout batch, ppo_epochs 1, old log-probs from the rollout: one step whose loss and
    gradient are the whole round's token-mean, however it is micro-batched."""
    module = make_module(rollout_batch_size=4, micro_batch_size=3)
    samples = round_samples(module, 4, off_policy=0.05)
    tb = collate_samples(samples, module.tokenizer.pad_token_id)
    ref = copy.deepcopy(module)
    want_loss, want_grads = full_batch(ref, tb)
    grads: list = []
    attach(module, torch.optim.SGD(module.trainable_parameters(), lr=0.0), grads)
    out = module.update(tb, [(s.level, s.group) for s in samples])
    assert len(grads) == 1
    assert out["loss"] == pytest.approx(want_loss, abs=1e-6)
    for a, b in zip(grads[0], want_grads):
        assert torch.allclose(a, b, atol=1e-6)


def ratio_recorder(monkeypatch) -> list[float]:
    """Max |ratio - 1| over loss tokens of every policy-loss call (one call per micro-batch)."""
    seen: list[float] = []
    original = core.policy_loss

    def recording(logp, old_logp, advantages, mask, *args, **kwargs):
        r = torch.exp(logp.detach() - old_logp)
        seen.append(float(((r - 1).abs() * mask).max()))
        return original(logp, old_logp, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(core, "policy_loss", recording)
    return seen


def test_four_mini_batches_with_recompute_start_at_ratio_one_then_move_off_it(monkeypatch):
    module = make_module(rollout_batch_size=8, mini_batch_size=2, old_log_probs="recompute", lr=3e-3,
                         loss=LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0))
    samples = round_samples(module, 8, off_policy=0.3)       # the sampler's log-probs are off by ~0.3 nats
    tb = collate_samples(samples, module.tokenizer.pad_token_id)
    attach(module, torch.optim.Adam(module.trainable_parameters(), lr=module.method_cfg.lr))
    mismatch = module.behaviour_log_probs(tb)
    assert mismatch["rollout_mismatch/kl_k3"] > 1e-3        # the sampler's numbers were not the trainer's
    seen = ratio_recorder(monkeypatch)
    module.update(tb, [(s.level, s.group) for s in samples])
    steps = module.last_step_metrics
    assert len(steps) == 4 and len(seen) == 4                # one micro-batch per mini-batch here
    assert seen[0] <= 1e-6 and steps[0]["clipfrac_low"] == steps[0]["clipfrac_high"] == steps[0]["dual_clipfrac"] == 0
    assert all(s > 1e-4 for s in seen[1:])                   # later mini-batches meet a policy that has moved


def test_without_recompute_the_first_step_already_sees_the_samplers_mismatch(monkeypatch):
    module = make_module(rollout_batch_size=8, mini_batch_size=2)
    samples = round_samples(module, 8, off_policy=0.3)
    tb = collate_samples(samples, module.tokenizer.pad_token_id)
    attach(module, torch.optim.SGD(module.trainable_parameters(), lr=0.0))
    seen = ratio_recorder(monkeypatch)
    module.update(tb, [(s.level, s.group) for s in samples])
    assert seen[0] > 0.01


@pytest.mark.parametrize("nll_norm", ["tokens", "positive"])
def test_micro_batching_a_mini_batch_changes_nothing_positive_nll_included(nll_norm):
    grads = {}
    for micro in (1, 3, 16):
        module = make_module(rollout_batch_size=4, mini_batch_size=2, micro_batch_size=micro,
                             loss=LossConfig(nll_coef=0.5, nll_norm=nll_norm))
        samples = round_samples(module, 4, off_policy=0.1)
        tb = collate_samples(samples, module.tokenizer.pad_token_id)
        rec: list = []
        attach(module, torch.optim.SGD(module.trainable_parameters(), lr=1e-2), rec)
        module.update(tb, [(s.level, s.group) for s in samples])
        grads[micro] = rec
    for micro in (3, 16):
        for step in range(2):
            for a, b in zip(grads[1][step], grads[micro][step]):
                assert torch.allclose(a, b, atol=1e-6), (micro, step)


def test_positive_nll_term_is_lambda_times_the_mean_nll_over_positive_tokens():
    lam = 0.5
    plain = make_module(rollout_batch_size=2)
    samples = round_samples(plain, 2)
    tb = collate_samples(samples, plain.tokenizer.pad_token_id)
    base, _ = full_batch(plain, tb)
    module = make_module(rollout_batch_size=2, loss=LossConfig(nll_coef=lam, nll_norm="positive"))
    with_nll, _ = full_batch(module, tb)
    # by hand: the positive-advantage samples are the second of each group; NLL = -sum(logp) / their token count
    logps, n = 0.0, 0
    for s in samples:
        if s.advantage > 0:
            with torch.no_grad():
                logits = module.policy(input_ids=torch.tensor([s.context + s.response])).logits[0, len(s.context) - 1:-1]
                logps += core.token_logprobs(logits, torch.tensor(s.response)).sum().item()
            n += len(s.response)
    assert with_nll - base == pytest.approx(lam * (-logps / n), abs=1e-5)


def test_recompute_with_the_hf_backend_matches_the_rollout_and_dcore_shapes_with_its_entropy():
    from tirl.rollout.backend import HFBackend
    from tirl.rollout.types import SamplingParams

    module = make_module(rollout_batch_size=2, old_log_probs="recompute", micro_batch_size=3)
    tok = module.tokenizer
    torch.manual_seed(0)
    prompts = [tok.encode(PROMPTS[i // 2]) for i in range(4)]
    gens = HFBackend(module.policy, tok).generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0,
                                                                          stop_at_code=False))
    samples = [Sample(p, g.ids, [1] * len(g.ids), g.log_probs, g.entropies, 0.0, group=i // 2)
               for i, (p, g) in enumerate(zip(prompts, gens))]
    tb = collate_samples(samples, tok.pad_token_id)
    sampler_logp, sampler_ent = tb.old_log_probs.clone(), tb.entropy.clone()
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0)
    metrics = module.behaviour_log_probs(tb)
    keep = tb.response_mask.bool()
    assert metrics["rollout_mismatch/max_abs_logp_diff"] <= 1e-4
    assert (tb.old_log_probs - sampler_logp)[keep].abs().max() <= 1e-4
    assert (tb.entropy - sampler_ent)[keep].abs().max() <= 1e-4 and tb.entropy[keep].min() > 0
    # DA-GRPO reads the entropy the batch carries after the recompute: a sampler that reported none (0, as vLLM's
    # top-k estimate can be far off) still gets D-CORE's min(alpha * H, delta) from the trainer's entropy
    from tirl.methods.shaping import shape_advantages

    tb2 = collate_samples([Sample(s.context, s.response, s.response_mask, s.old_log_probs, [0.0] * len(s.response),
                                  0.0, group=s.group) for s in samples], tok.pad_token_id)
    module.behaviour_log_probs(tb2)
    shaped, frac = shape_advantages(tb2.advantages, tb2.entropy, tb2.response_mask, ShapingConfig(kind="da_grpo"))
    assert frac == 1.0
    assert torch.allclose(shaped[keep], (0.1 * tb.entropy[keep]).clamp(max=0.5), atol=1e-6)


def test_truncated_is_scales_the_policy_loss_token_by_token():
    """rollout_correction=tis multiplies each token's advantage by min(pi_old / pi_rollout, C): the clipped loss
    is positively homogeneous in A, so the loss is the weighted per-token loss."""
    module = make_module(rollout_batch_size=2, old_log_probs="recompute",
                         rollout_correction=RolloutCorrectionConfig(kind="tis", cap=1.5))
    samples = round_samples(module, 2, off_policy=0.5)
    tb = collate_samples(samples, module.tokenizer.pad_token_id)
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0)
    rollout_logp, adv = tb.old_log_probs.clone(), tb.advantages.clone()
    module.behaviour_log_probs(tb)
    metrics = module.correct_rollout_mismatch(tb)
    keep = tb.response_mask.bool()
    w = torch.exp(tb.old_log_probs - rollout_logp).clamp(max=1.5)
    assert torch.allclose(tb.advantages[keep], (adv * w)[keep], atol=1e-6)
    assert metrics["rollout_correction/weight_max"] == pytest.approx(1.5)
    assert 0 < metrics["rollout_correction/weight_mean"] < 1.5


# --------------------------------------------------------------------------- start checks


@pytest.mark.parametrize("trainer,callbacks,says", [
    ({"max_steps": 50}, {}, "trainer.max_steps=50 is not a multiple of 4"),
    ({"max_steps": 48, "val_check_interval": 10}, {}, "trainer.val_check_interval=10 is not a multiple of 4"),
    ({"max_steps": 48}, {"model_checkpoint": {"every_n_train_steps": 6}},
     "callbacks.model_checkpoint.every_n_train_steps=6 is not a multiple of 4"),
    ({"max_steps": -1}, {}, "decays over trainer.max_steps"),
])
def test_step_counts_that_a_round_of_four_steps_would_break_are_one_sentence(trainer, callbacks, says):
    from omegaconf import OmegaConf

    from tirl.config.preflight import check_step_counts, lightning_step_counts
    from tirl.config.validate import ConfigError

    typed = SimpleNamespace(method=MethodConfig(rollout_batch_size=32, mini_batch_size=8, lr_schedule="cosine"))
    cfg = OmegaConf.create({"trainer": trainer, "callbacks": callbacks})
    with pytest.raises(ConfigError, match=says) as err:
        check_step_counts(cfg, typed)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    ok = OmegaConf.create({"trainer": {"max_steps": 48, "val_check_interval": 8}, "callbacks": {}})
    check_step_counts(ok, typed)
    assert lightning_step_counts(ok, typed) == {"val_check_interval": 2}     # Lightning counts rounds


def test_tis_without_recompute_and_a_non_divisor_mini_batch_fail_at_start(train_cfg):
    from tirl.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match="set method.old_log_probs=recompute too"):
        validate(train_cfg("method.rollout_correction.kind=tis"))
    with pytest.raises(ConfigError, match="must be a multiple of method.mini_batch_size=3"):
        validate(train_cfg("method.mini_batch_size=3"))
