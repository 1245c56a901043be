"""The LightningModules on the tiny model: every preset runs, updates move what they should and nothing else,
dynamic sampling refills, micro-batching and resuming change nothing."""

import copy
import csv

import pytest
import torch

from tirl.config.schema import (
    EpisodeFilterConfig,
    LoraConfig,
    LossConfig,
    MethodConfig,
    ModelConfig,
    RolloutConfig,
    SandboxConfig,
    StepLevelConfig,
)
from tirl.models.tiny import load_tiny_tokenizer
from tirl.modules.grpo import GRPOModule
from tirl.rl.batch import Sample, collate_samples

TINY_RL = [
    "model=tiny_scratch", "method.group_size=2", "method.rollout_batch_size=2", "method.micro_batch_size=4",
    "rollout.max_new_tokens=16", "rollout.max_total_tokens=32", "rollout.max_tool_rounds=1", "data.val_size=2",
    "trainer.val_check_interval=2", "test=false", "method.lr=1e-3", "method.step_level.group_size=2",
]


def rows_of(out_dir):
    return list(csv.DictReader((out_dir / "csv" / "metrics.csv").open()))


def logged(rows, key) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def sampling_refilled_until_full_or_out_of_rounds(rows, want, max_rounds=3):
    """Dynamic sampling: a step that kept fewer groups than it wanted used every round it had."""
    kept, rounds = logged(rows, "train/filter/groups_kept"), logged(rows, "train/sampling_rounds")
    assert len(kept) == len(rounds) > 0
    assert all(k >= want or r == max_rounds for k, r in zip(kept, rounds))
    return rounds


def dcore_shapes_zero_advantage_tokens(rows):
    # a scratch model earns the D-CORE reward's floor on every sample: all groups flat, all advantages 0, so
    # DA-GRPO's entropy shaping is the only learning signal and must reach tokens
    assert all(-3.0 <= r <= 4.0 for r in logged(rows, "train/reward_mean"))
    assert max(logged(rows, "train/shaping/shaped_token_frac")) > 0
    # ...and moves them: the shaped advantages min(alpha * H, delta) are all > 0, so the first step's loss (ratio 1,
    # KL 0: policy = behaviour = reference) is -mean(A) < 0; without shaping it would be exactly 0
    assert logged(rows, "train/loss")[0] < 0


def dapo_drops_flat_groups_and_resamples(rows):
    # a scratch model scores 0 everywhere: every group is flat, DAPO drops it and dynamic sampling tries again
    assert sum(logged(rows, "train/filter/groups_dropped_zero_variance")) > 0
    assert max(sampling_refilled_until_full_or_out_of_rounds(rows, want=2)) > 1


def thor_filters_episodes_and_trains_the_step_level(rows):
    # the warm model writes code, some of which fails: the episode filter drops those trajectories (counted), the
    # step level resamples from before each failing block and trains on the continuations
    assert sum(logged(rows, "train/filter/dropped_failed_call")) > 0
    sampling_refilled_until_full_or_out_of_rounds(rows, want=2)
    assert sum(logged(rows, "train/step_level/prefixes")) > 0
    assert sum(logged(rows, "train/step_level/samples")) > 0


NOISE = ("past_key_values", "module(s) in eval mode", "LeafSpec")
OWN_PARTS = {"dcore": dcore_shapes_zero_advantage_tokens, "dapo": dapo_drops_flat_groups_and_resamples,
             "thor": thor_filters_episodes_and_trains_the_step_level}
WARM = ["model=tiny", "rollout.max_new_tokens=96", "rollout.max_total_tokens=128"]   # writes code blocks to run


@pytest.mark.parametrize("method,data", [
    ("sft", "sft_synthetic_math"), ("grpo", "synthetic_math"), ("dr_grpo", "synthetic_math"),
    ("dapo", "synthetic_math"), ("dcore", "synthetic_toolcall"), ("thor", "synthetic_math"),
])
def test_every_method_preset_trains_on_the_tiny_model(train_cfg, tmp_path, recwarn, caplog, method, data):
    """Each preset runs end to end, quietly, and the parts that make it that method act (not just: a metric was
    logged)."""
    from tirl.train import run

    extra = ["data.synthetic.size=16", "data.batch_size=4", "optimized_metric=val/loss"] if method == "sft" else []
    base = [o for o in TINY_RL if not o.startswith(("model=", "rollout.max_"))] + WARM if method == "thor" else TINY_RL
    cfg = train_cfg(*base, f"method={method}", f"data={data}", "trainer.max_steps=2", *extra)
    value = run(cfg)
    rows = rows_of(tmp_path)
    key = "train/loss" if method == "sft" else "train/reward_mean"
    assert [r for r in rows if r.get(key)], f"{method} logged no {key}"
    assert value is not None and value == value        # the optimised metric exists and is not NaN
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if method in OWN_PARTS:
        OWN_PARTS[method](rows)
    # a newcomer's first run shows no library noise (tirl.logging.quiet, the KV-cache keyword, the policy's mode)
    noise = [str(w.message) for w in recwarn if any(n in str(w.message) for n in NOISE)]
    assert not noise and not [r for r in caplog.records if "Tip:" in r.getMessage()]


def make_module(**method_kw):
    tok = load_tiny_tokenizer()
    model = method_kw.pop("model", ModelConfig(name_or_path="tiny"))
    method = MethodConfig(**{"lr": 1e-2, "micro_batch_size": 8, **method_kw})
    module = GRPOModule(method, model, RolloutConfig(max_new_tokens=16, max_total_tokens=32), SandboxConfig(workers=1), tok)
    module.configure_model()
    return module, tok


def fixed_batch(module, tok, n=4, seed=0):
    """n random responses after one prompt, with advantages +1/-1 and old log-probs = the current policy's."""
    g = torch.Generator().manual_seed(seed)
    prompt = tok.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    samples = []
    for i in range(n):
        resp = torch.randint(10, 500, (6 + i,), generator=g).tolist()
        samples.append(Sample(prompt, resp, [1] * len(resp), [0.0] * len(resp), [1.0] * len(resp), 1.0 if i % 2 else -1.0))
    tb = collate_samples(samples, tok.pad_token_id)
    with torch.no_grad():
        from tirl.rl import core

        logits = module.policy(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
        tb.old_log_probs = core.token_logprobs(logits, tb.targets) * tb.response_mask
    return tb


def sgd_steps(module, tb, steps):
    opt = torch.optim.SGD(module.trainable_parameters(), lr=module.method_cfg.lr)
    counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, metrics = module.micro_batch_loss(tb, counts)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, metrics


def test_policy_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    module, tok = make_module(lr=0.05)
    losses, metrics = sgd_steps(module, fixed_batch(module, tok), 12)
    # ratio 1 at the start: token-mean of -A over lengths 6,7,8,9 with A = -1,+1,-1,+1 → -(−6+7−8+9)/30
    assert losses[0] == pytest.approx(-2 / 30, abs=1e-6)
    # the clipped surrogate cannot go below every ratio at its bound: (-1.2·(7+9) + 0.8·(6+8)) / 30 = -8/30
    floor = -8 / 30
    assert all(x >= floor - 1e-5 for x in losses)
    assert losses[-1] < losses[0] - 0.1 and losses[-1] < losses[len(losses) // 2] + 1e-6
    assert metrics["clipfrac_high"] > 0 or metrics["clipfrac_low"] > 0   # it went far enough to hit the clip


def test_micro_batches_give_the_full_batch_gradient():
    module, tok = make_module()
    tb = fixed_batch(module, tok, n=4)
    counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}

    def grads(chunks):
        module.policy.zero_grad()
        for idx in chunks:
            loss, _ = module.micro_batch_loss(tb.select(idx), counts)
            loss.backward()
        return [p.grad.clone() for p in module.trainable_parameters()]

    full, split = grads([[0, 1, 2, 3]]), grads([[0], [1, 2], [3]])
    for a, b in zip(full, split):
        assert torch.allclose(a, b, atol=1e-6)


def test_reference_does_not_move_and_kl_appears():
    module, tok = make_module(loss=LossConfig(kl_coef=0.1), lr=0.5)
    module.setup("fit")
    try:
        assert module.frozen_ref is not None
        before = copy.deepcopy(module.frozen_ref.state_dict())
        policy_before = copy.deepcopy(module.policy.state_dict())
        _, metrics = sgd_steps(module, fixed_batch(module, tok), 3)
        assert all(torch.equal(before[k], v) for k, v in module.frozen_ref.state_dict().items())
        assert any(not torch.equal(policy_before[k], v) for k, v in module.policy.state_dict().items())
        assert metrics["kl"] > 0
    finally:
        module.teardown("fit")


def test_lora_changes_only_adapter_weights_and_its_reference_is_the_base():
    torch.manual_seed(0)
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    module, tok = make_module(model=ModelConfig(name_or_path="tiny", lora=lora), loss=LossConfig(kl_coef=0.1), lr=0.5)
    module.setup("fit")
    try:
        assert module.frozen_ref is None                     # no second model
        tb = fixed_batch(module, tok)
        with torch.no_grad():
            base_logits = module.policy.get_base_model()(input_ids=tb.input_ids).logits.clone()
        before = {k: v.clone() for k, v in module.policy.state_dict().items()}
        _, metrics = sgd_steps(module, tb, 3)
        after = module.policy.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all("lora_" in k for k in changed)
        from tirl.models.reference import reference_model

        with reference_model(module.policy, None) as ref, torch.no_grad():
            assert torch.allclose(ref(input_ids=tb.input_ids).logits, base_logits, atol=1e-5)
        assert metrics["kl"] > 0
    finally:
        module.teardown("fit")


def test_dynamic_sampling_refills_a_batch_of_zero_variance_groups():
    filt = EpisodeFilterConfig(enabled=True, drop_failed_calls=False, drop_no_boxed=False, min_response_tokens=0,
                               zero_on_repetition=False, min_group_survivors=1, drop_zero_variance=True,
                               dynamic_sampling=True, max_sampling_rounds=4)
    module, tok = make_module(group_size=4, episode_filter=filt)
    module.setup("fit")
    try:
        # reward: 1 for every sample of a "flat" prompt (zero variance), alternating 0/1 for a "mixed" prompt
        def reward(texts, answer, **_):
            return [1.0 if a == "flat" else float(i % 2) for i, a in enumerate(answer)]

        module.reward_fn = module.accuracy_fn = reward
        msg = [{"role": "user", "content": "hi"}]
        refills = []

        def refill(n):
            refills.append(n)
            return [{"id": f"m{len(refills)}-{i}", "messages": msg, "answer": "mixed"} for i in range(n)]

        module.refill_prompts = refill
        flat = [{"id": f"f{i}", "messages": msg, "answer": "flat"} for i in range(2)]
        trajs, rewards, correct, samples, stats = module.make_experience(flat)
        assert refills == [2] and stats["sampling_rounds"] == 2
        assert stats["filter/groups_kept"] == 2 and len(samples) == 8       # the two refilled groups, G=4 each
        assert {s.advantage > 0 for s in samples} == {True, False}
        assert len(trajs) == 16                                          # 2 dropped + 2 refilled groups rolled out
    finally:
        module.teardown("fit")


# issue 18: with 2 mini-batches a round (2 optimizer steps) and recomputed old log-probs, a checkpoint between rounds
# resumes the same shuffle (a function of the round index) and the same losses
@pytest.mark.parametrize("schedule", [[], ["method.mini_batch_size=1", "method.old_log_probs=recompute"]],
                         ids=["one_step_a_round", "two_mini_batches_recompute"])
def test_resume_logs_the_same_losses_as_an_uninterrupted_run(train_cfg, tmp_path, schedule):
    from tirl.train import run

    every = 2 if schedule else 1
    common = [*TINY_RL, "method=dcore", "data=synthetic_toolcall", "trainer.max_steps=4",
              "trainer.limit_val_batches=0", "optimized_metric=null", "callbacks.model_checkpoint.monitor=null",
              f"callbacks.model_checkpoint.every_n_train_steps={every}", "callbacks.model_checkpoint.save_top_k=-1",
              *schedule]
    a, b = tmp_path / "a", tmp_path / "b"
    run(train_cfg(*common, out=a))
    ckpt = a / "checkpoints" / "step_000002.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (a / "checkpoints").iterdir())
    run(train_cfg(*common, f"ckpt_path={ckpt}", out=b))

    def by_step(rows, key):
        return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}

    for key in ("train/entropy", "train/reward_mean", "train/response_len", "train/approx_kl", "train/kl", "train/loss"):
        full, resumed = by_step(rows_of(a), key), by_step(rows_of(b), key)
        # rows after the checkpoint at optimizer step 2 (metric rows count rounds: 2 rounds of 2 steps, or 4 of 1)
        assert set(resumed) == ({1} if schedule else {2, 3}), resumed
        assert any(full[s] != 0 for s in full) or key != "train/loss"
        for s in resumed:
            assert resumed[s] == pytest.approx(full[s], abs=1e-6), (key, s)
    if schedule:
        return
    # a real dcore .ckpt (full fine-tune, kl > 0: it holds the KL reference copy) refuses settings it does not fit
    from tirl.config import ConfigError
    from tirl.config.preflight import check_paths

    for change, says in (("method.loss.kl_coef=0.0", r"written with method.loss.kl_coef=0.001 \(with a KL reference"),
                         ("model.lora.enabled=true", "was written with model.lora.enabled=false")):
        with pytest.raises(ConfigError, match=says):
            check_paths(train_cfg(*common, change, f"ckpt_path={ckpt}", out=tmp_path / "c"), None)


def test_all_zero_advantage_step_leaves_the_weights_alone(train_cfg, tmp_path):
    """Random tiny model + math: every reward is 0, so every advantage is 0. The update must be skipped (asserted
    through skipped_update: on a fresh optimizer Adam's momentum is still zero, so the weights alone could not tell),
    the step still counts, and the weights are the initial ones."""
    from tirl.train import run

    cfg = train_cfg(*TINY_RL, "method=grpo", "data=synthetic_math", "trainer.max_steps=3", "validate_before_fit=false",
                    "trainer.limit_val_batches=0", "optimized_metric=null", "callbacks.model_checkpoint.monitor=null")
    run(cfg)
    rows = [r for r in rows_of(tmp_path) if r.get("train/reward_mean")]
    assert len(rows) == 3 and all(float(r["train/reward_mean"]) == 0 for r in rows)
    assert all(float(r["train/skipped_update"]) == 1.0 for r in rows)
    import torch as _torch

    from tirl.models.tiny import build_tiny

    state = _torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    fresh = build_tiny(0)[0].state_dict()
    assert all(_torch.equal(state[f"policy.{k}"], v) for k, v in fresh.items())
    assert state and _torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_shared_contexts_give_the_same_loss_and_gradient_as_whole_sequences():
    """Two prompts of different lengths, three samples each, one with tool tokens (no loss) inside its response:
    reading each prompt once and continuing every row from its cache changes nothing but the work."""
    module, tok = make_module(loss=LossConfig(kl_coef=0.1, nll_coef=0.5))
    module.setup("fit")
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():   # move the policy off its frozen reference so the KL term is not 0
            for p in module.policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        prompts = [tok.encode("<|im_start|>user\nq<|im_end|>\n"), tok.encode("a longer prompt than the other")]
        samples = []
        for i in range(6):
            resp = torch.randint(10, 500, (5 + 2 * i,), generator=g).tolist()
            mask = [1] * len(resp)
            if i == 4:
                mask[2:5] = [0, 0, 0]   # an environment's output
            old = (torch.randn(len(resp), generator=g) * 0.1 - 6).tolist()
            samples.append(Sample(prompts[i % 2], resp, mask, old, [1.0] * len(resp), float(i % 3 - 1)))
        tb = collate_samples(samples, tok.pad_token_id)
        shared = tb.shared_contexts()
        assert shared is not None and shared.ctx_ids.shape[0] == 2 and shared.row_ctx.tolist() == [0, 1] * 3
        assert int(shared.tokens.response_mask.sum()) == int(tb.response_mask.sum()) == sum(sum(s.response_mask) for s in samples)
        counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}

        def loss_and_grads(share: bool):
            module.share_contexts = share
            module.policy.zero_grad()
            loss, metrics = module.micro_batch_loss(tb, counts)
            loss.backward()
            return loss.item(), metrics["kl"].item(), [p.grad.clone() for p in module.trainable_parameters()]

        (l1, kl1, g1), (l2, kl2, g2) = loss_and_grads(True), loss_and_grads(False)
        assert l1 == pytest.approx(l2, abs=1e-6) and kl1 == pytest.approx(kl2, abs=1e-7) and kl1 > 0
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    finally:
        module.teardown("fit")


def test_rows_without_a_shared_context_or_a_loss_token_stay_whole():
    _, tok = make_module()
    a = Sample([5, 6], [7, 8], [1, 1], [0.0, 0.0], [0.0, 0.0], 1.0)
    b = Sample([5, 9], [7, 8], [1, 1], [0.0, 0.0], [0.0, 0.0], 1.0)
    assert collate_samples([a, b], tok.pad_token_id).shared_contexts() is None           # different prompts
    silent = Sample([5, 6], [7, 8], [0, 0], [0.0, 0.0], [0.0, 0.0], 0.0)
    assert collate_samples([a, a, silent], tok.pad_token_id).shared_contexts() is None   # a row with no loss
    assert collate_samples([a, a], tok.pad_token_id).shared_contexts().ctx_ids.tolist() == [[5, 6]]


@pytest.mark.parametrize("method", ["dcore", "grpo"])   # dcore updates (KL term); grpo on a random model skips
def test_ppo_epochs_count_as_optimizer_steps_for_max_steps_and_the_schedule(train_cfg, tmp_path, method):
    """With ppo_epochs=2 one batch of prompts is two optimizer steps, updated or skipped alike: max_steps=4 is two
    rollout batches, and the LR schedule has advanced exactly as far as global_step."""
    from tirl.train import run

    data = "data=synthetic_math" if method == "grpo" else "data=synthetic_toolcall"
    run(train_cfg(*TINY_RL, f"method={method}", data, "method.ppo_epochs=2", "trainer.max_steps=4",
                  "validate_before_fit=false", "trainer.limit_val_batches=0", "optimized_metric=null",
                  "callbacks.model_checkpoint.monitor=null", out=tmp_path))
    rows = [r for r in rows_of(tmp_path) if r.get("train/reward_mean")]
    assert len(rows) == 2
    assert {float(r.get("train/skipped_update") or 0.0) for r in rows} == {1.0 if method == "grpo" else 0.0}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 4


def test_step_level_weight_scales_only_the_step_level_term():
    """L = L_episode + w * L_step: w = 0 leaves exactly the episode rows' loss, and the loss is linear in w."""
    losses = {}
    for w in (0.0, 0.5, 1.0):
        module, tok = make_module(step_level=StepLevelConfig(weight=w))
        tb = fixed_batch(module, tok, n=4)
        tb.level = ["episode", "episode", "step", "step"]
        counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}
        losses[w] = module.micro_batch_loss(tb, counts)[0].item()
        if w == 0.0:
            episode_only = tb.select([0, 1])
            alone = module.micro_batch_loss(episode_only, {"episode": counts["episode"], "step": (1.0, 1.0)})[0].item()
    assert losses[0.0] == pytest.approx(alone, abs=1e-6)
    assert losses[1.0] != pytest.approx(losses[0.0], abs=1e-4)       # the step rows do carry loss
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, abs=1e-6)


def test_a_prompt_over_the_budget_keeps_its_end_and_is_reported_once(caplog):
    module, _ = make_module()
    record = {"id": "long-1", "messages": [{"role": "user", "content": "word " * 200}]}
    module.rollout_cfg.max_prompt_tokens = 10_000
    full = module.encode_prompt(record)
    module.rollout_cfg.max_prompt_tokens = 50
    with caplog.at_level("WARNING", logger="tirl.modules.grpo"):
        cut = module.encode_prompt(record)
        module.encode_prompt(record)
    assert len(full) > 50 and cut == full[-50:]  # the assistant header at the end survives
    warnings = [r.getMessage() for r in caplog.records if "max_prompt_tokens" in r.getMessage()]
    assert len(warnings) == 1 and "long-1" in warnings[0]


def test_held_out_accuracy_is_broken_down_by_category_and_level():
    from tirl.modules.validation import record_kind

    assert record_kind({"category": "parallel"}) == "parallel" and record_kind({"level": 3}) == "level3"
    assert record_kind({"messages": []}) is None
    module, _ = make_module()
    outs = [{"correct": 1.0, "kind": "simple"}, {"correct": 0.0, "kind": "simple"}, {"correct": 0.0, "kind": "simple"},
            {"correct": 1.0, "kind": "irrelevance"}, {"correct": 1.0, "kind": None}]
    assert module.accuracy_by_kind(outs) == {"irrelevance": 1.0, "simple": 1 / 3}


# ---------------------------------------------------------------- SFT: one normaliser per optimizer step


@pytest.mark.parametrize("batch_size,accumulate", [(2, 1), (1, 2)])
def test_sft_step_gradient_is_the_token_mean_over_the_whole_step_however_micro_batched(tmp_path, batch_size, accumulate):
    """Two samples with 2 and 151 loss tokens, one optimizer step: as one batch of 2, or as 2 accumulated micro-batches
    of 1. Either way the gradient is that of sum(NLL) / 153 computed by hand in one pass; the old normalisation (each
    micro-batch's own token mean, averaged by Lightning) is far from it, so the check can tell."""
    import lightning.pytorch as pl
    from sft_grads import (
        RecordingSFT,
        datamodule,
        examples_with_loss_tokens,
        full_batch_gradient,
        relative_error,
        sft_kwargs,
    )

    examples = examples_with_loss_tokens([2, 151])
    module = RecordingSFT(str(tmp_path), **sft_kwargs())
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule(examples, batch_size))
    rec = torch.load(tmp_path / "step0_rank0.pt")
    assert len(rec["batches"]) == accumulate
    seen = sorted(int((b["labels"][:, 1:] != -100).sum()) for b in rec["batches"])
    assert sum(seen) == 153 and (accumulate == 1 or seen == [2, 151])
    want = full_batch_gradient(module, rec["weights"], rec["batches"])
    assert relative_error(rec["grads"], want) < 1e-5
    if accumulate > 1:
        assert relative_error(full_batch_gradient(module, rec["weights"], rec["batches"], per_micro_batch=True), want) > 0.5



# ---------------------------------------------------------------- metrics: each value at its own step


class ScriptedGRPO(GRPOModule):
    """GRPO without generation: G fixed 3-token responses per prompt, and rewards by training step (0/1 alternating,
    all 0 on ``skip_steps``, whose advantages are then all 0 and whose update is skipped: no KL term)."""

    def __init__(self, skip_steps: set[int], **kwargs):
        super().__init__(**kwargs)
        self.skip_steps = skip_steps

    def rollout_groups(self, records, group_size, loop=None):
        from tirl.rollout.types import Trajectory

        trajs = []
        for gi, r in enumerate(records):
            ids = self.encode_prompt(r)
            for j in range(group_size):
                meta = {"group": gi, "id": r["id"], "answer": r["answer"], "task": r["task"]}
                trajs.append(Trajectory(ids, [10 + j, 11 + j, 12], [1, 1, 1], [-2.0] * 3, [0.5] * 3, meta=meta))
        return trajs

    def score(self, trajs, records):
        from tirl.logging.step_metrics import log_step

        skip = self.trainer.training and log_step(self.trainer) in self.skip_steps
        rewards = [0.0 if skip else float(i % 2) for i in range(len(trajs))]
        return rewards, rewards


@pytest.mark.parametrize("max_steps,val_every,val_steps", [(3, 2, [0, 1, 2]), (4, 2, [0, 1, 3])])
def test_metric_rows_hold_only_their_steps_values_and_every_file_agrees_on_steps(tmp_path, max_steps, val_every,
                                                                                  val_steps):
    """Step 1's update is skipped. Its metrics.csv row must not carry the loss, grad norm or clip fractions of step 0
    (Lightning re-writes a key's last value by default), and must say skipped_update=1 while the others say 0. The
    samples files use metrics.csv's step numbers. Validation: before fit (step 0), every ``val_every`` steps, and
    after the last step whatever the interval, once."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from tirl.callbacks import ValidateAtEndOfFit
    from tirl.data.collate import collate_prompts

    tok = load_tiny_tokenizer()
    module = ScriptedGRPO({1}, method=MethodConfig(lr=1e-3, group_size=2, micro_batch_size=8, log_samples=2),
                          model=ModelConfig(name_or_path="tiny"), rollout=RolloutConfig(max_tool_rounds=0),
                          sandbox=SandboxConfig(workers=1), tokenizer=tok)
    records = [{"id": f"p{i}", "task": "math", "answer": "1", "messages": [{"role": "user", "content": f"q{i}"}]}
               for i in range(2 * max_steps)]
    train = DataLoader(records, batch_size=2, collate_fn=collate_prompts)
    val = DataLoader(records[:2], batch_size=2, collate_fn=collate_prompts)
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=val_every,
                         check_val_every_n_epoch=None, logger=logger, log_every_n_steps=1,
                         callbacks=[ValidateAtEndOfFit()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.validate(module, val, verbose=False)
    trainer.fit(module, train, val)
    log_dir = tmp_path / "csv" / "version_0"
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    train_rows = {int(r["step"]): r for r in rows if r.get("train/reward_mean")}
    assert sorted(train_rows) == list(range(max_steps))
    update_keys = ("train/loss", "train/grad_norm", "train/clipfrac_high", "train/clipfrac_low", "train/approx_kl")
    for step, r in train_rows.items():
        skipped = step == 1
        assert float(r["train/skipped_update"]) == float(skipped), step
        for key in update_keys:
            assert bool(r.get(key)) != skipped, (step, key)     # present exactly on the steps that updated
    assert float(train_rows[0]["train/loss"]) != float(train_rows[2]["train/loss"])
    assert "train/sandbox_calls_per_sample" not in rows[0]      # no tool rounds: no sandbox metrics at all
    # validation rows: once before fit, at the interval, and after the last step (not twice when it is a val step)
    assert [int(r["step"]) for r in rows if r.get("val/acc")] == val_steps
    # the samples tables use the metrics' step numbers (log_samples=2 rows per step or validation)
    train_samples = [int(r["step"]) for r in csv.DictReader((log_dir / "train_samples.csv").open())]
    val_samples = [int(r["step"]) for r in csv.DictReader((log_dir / "val_samples.csv").open())]
    assert train_samples == [s for s in range(max_steps) for _ in range(2)]
    assert val_samples == [s for s in val_steps for _ in range(2)]


def test_a_run_shorter_than_the_validation_interval_reports_after_training_and_names_what_it_counts(train_cfg, tmp_path):
    """3 D-CORE steps with val_check_interval=10: validation before (step 0) and after the last step (step 2). Function
    calling never runs the sandbox (even with tool rounds on): no sandbox_* metrics, function calls counted instead."""
    from tirl.train import run

    cfg = train_cfg(*TINY_RL, "method=dcore", "data=synthetic_toolcall", "trainer.max_steps=3",
                    "trainer.val_check_interval=10", "optimized_metric=val/acc")
    run(cfg)
    rows = rows_of(tmp_path)
    assert [int(r["step"]) for r in rows if r.get("val/acc")] == [0, 2]
    train = [r for r in rows if r.get("train/reward_mean")]
    assert len(train) == 3 and all(r.get("train/function_calls_per_sample") for r in train)
    assert not [k for k in rows[0] if "sandbox" in k or k.startswith("train/tool_")]


def test_sft_resume_mid_epoch_continues_with_the_same_micro_batches(train_cfg, tmp_path):
    """SFT with 2 accumulated micro-batches a step: resuming from the step-2 checkpoint logs the same step-3/4 losses
    as the uninterrupted run (the train stream restarts where the checkpoint left it, not at the epoch's start)."""
    from tirl.train import run

    common = ["model=tiny_scratch", "method=sft", "data=sft_synthetic_math", "data.synthetic.size=24",
              "data.batch_size=2", "data.val_size=2", "trainer.accumulate_grad_batches=2", "trainer.max_steps=4",
              "trainer.limit_val_batches=0", "validate_before_fit=false", "test=false", "optimized_metric=null",
              "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.every_n_train_steps=1",
              "callbacks.model_checkpoint.save_top_k=-1", "method.lr=1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    run(train_cfg(*common, out=a))
    ckpt = a / "checkpoints" / "step_000002.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (a / "checkpoints").iterdir())
    run(train_cfg(*common, f"ckpt_path={ckpt}", out=b))

    def losses(out):
        return {int(r["step"]): float(r["train/loss"]) for r in rows_of(out) if r.get("train/loss")}

    full, resumed = losses(a), losses(b)
    assert sorted(full) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    for s in resumed:
        assert resumed[s] == pytest.approx(full[s], abs=1e-5), s


def test_score_hands_the_reward_the_tools_and_category_columns():
    """The reward needs what BFCL's checker uses: an integer-typed doc fails `f(n=2.0)`, a float-typed one passes
    it, and an irrelevance category turns `[]`-gold prose into a pass; the module must pass those columns on."""
    from types import SimpleNamespace

    from tirl.rewards import get_reward

    def doc(kind):
        return [{"name": "f", "parameters": {"type": "dict", "required": ["n"], "properties": {"n": {"type": kind}}}}]

    records = [{"answer": [{"f": {"n": [2]}}], "tools": doc("float"), "category": "simple"},
               {"answer": [{"f": {"n": [2]}}], "tools": doc("integer"), "category": "simple"},
               {"answer": [], "tools": doc("integer"), "category": "live_relevance"}]
    trajs = [SimpleNamespace(meta={"group": g}, text=text)
             for g, text in [(0, "[f(n=2.0)]"), (1, "[f(n=2.0)]"), (2, "[f(n=2.0)]"), (2, "No.")]]
    fake = SimpleNamespace(reward_text=lambda t: t.text, reward_fn=get_reward("toolcall"),
                           accuracy_fn=get_reward("toolcall_exact"))
    rewards, correct = GRPOModule.score(fake, trajs, records)
    assert correct == [1.0, 0.0, 1.0, 0.0]
    assert rewards[0] == 3.0 and rewards[1] < 3.0 and rewards[2] == 3.0 and rewards[3] == -3.0
