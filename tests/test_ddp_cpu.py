"""SFT and GRPO under real 2-process DDP on the CPU (gloo). SFT: an optimizer step's gradient over 2 ranks x 2
accumulated micro-batches is the one-process gradient of the whole step's token mean, a short last step included.
GRPO: the gradient of a batch split over two ranks is the gradient
of the whole batch in one process — global token-mean over both ranks, ``× world_size`` undoing DDP's average,
zero-weighted padding passes on a rank with fewer micro-batches (or none) — and a tiny ``hardware=ddp`` run
trains end to end.

The first test drives the real ``GRPOModule.training_step``/``update`` under Lightning's DDP (spawned ranks); only
``make_experience`` is replaced, so each rank "rolls out" a fixed share of five known samples (four episode-level, one
THOR step-level), and two PPO epochs run per update.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

from tirl.config import CONFIG_DIR
from tirl.config.schema import MethodConfig, ModelConfig, RolloutConfig, SandboxConfig
from tirl.data.synthetic_toolcall import CATEGORIES
from tirl.models.tiny import load_tiny_tokenizer
from tirl.modules.grpo import GRPOModule
from tirl.rl import core
from tirl.rl.batch import Sample, collate_samples
from tirl.rollout.types import Trajectory

pytestmark = pytest.mark.slow   # each test starts real processes: ~20 s apiece on two loaded cores

REPO = CONFIG_DIR.parent
WORLD = 2
LR = 1e-3
PPO_EPOCHS = 2                      # two optimiser steps per update: gradients restart from zero for the second
RESPONSE_LENGTHS = (3, 5, 4, 7)     # two groups of G=2: samples 0,1 and 2,3; 19 loss tokens in all
STEP_LENGTH = 6                     # sample 4: one THOR step-level continuation, its own 6-token normaliser
# Which samples each rank holds, one split per training step (micro_batch_size=1, so one pass per sample):
SPLITS = [
    ([0, 1], [2, 3, 4]),     # a whole group per rank, 8 vs 11 episode tokens: a rank-local token-mean would differ
    ([0, 1, 2, 4], [3]),     # rank 1: 1 real pass + 3 zero-weighted ones to join rank 0's 4 gradient syncs
    ([0, 1, 2, 3, 4], []),   # rank 1 rolled out nothing it keeps: it trains on the empty batch, 5 passes
]


def method_config() -> MethodConfig:
    # max_grad_norm huge: clipping would rescale a wrongly scaled gradient to the same norm and hide the error
    return MethodConfig(lr=LR, micro_batch_size=1, max_grad_norm=1e6, group_size=2, ppo_epochs=PPO_EPOCHS)


class FixedRolloutGRPO(GRPOModule):
    """GRPOModule whose ``make_experience`` hands each rank its share of fixed samples; records what the update saw."""

    def __init__(self, samples: list[Sample], out_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.fixed_samples, self.out_dir = samples, out_dir
        self.seen_counts: dict[str, tuple[float, float]] = {}
        self.passes = 0
        self.updates = 0

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)
        super().setup(stage)

    def make_experience(self, records: list[dict]):
        mine = [self.fixed_samples[i] for i in SPLITS[self.updates][self.global_rank]]
        self.updates += 1
        trajs = [Trajectory(s.context, s.response, s.response_mask, s.old_log_probs, s.entropies, meta={"group": i // 2})
                 for i, s in enumerate(mine)]
        rewards = [s.advantage for s in mine]
        # a metric both ranks report with different values, and one only rank 1 reports
        stats = {"probe": float(self.global_rank), **({"only_rank1": 4.0} if self.global_rank == 1 else {})}
        return trajs, rewards, [0.0] * len(mine), mine, stats

    def mean_over_ranks(self, metrics):
        out = super().mean_over_ranks(metrics)
        torch.save(out, os.path.join(self.out_dir, f"metrics{self.updates - 1}_rank{self.global_rank}.pt"))
        return out

    def global_counts(self, batch, level):
        self.seen_counts[level] = super().global_counts(batch, level)
        return self.seen_counts[level]

    def manual_backward(self, loss, *args, **kwargs) -> None:
        self.passes += 1
        super().manual_backward(loss, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        # after the last backward and the clip, before the step: the gradient the optimiser is about to apply
        # (global_step counts optimiser steps: PPO_EPOCHS per update)
        grads = {n: p.grad.detach().clone() for n, p in self.policy.named_parameters() if p.grad is not None}
        weights = {n: p.detach().clone() for n, p in self.policy.named_parameters()}    # the point it was taken at
        record = {"grads": grads, "weights": weights, "counts": dict(self.seen_counts), "passes": self.passes}
        torch.save(record, os.path.join(self.out_dir, f"step{self.global_step}_rank{self.global_rank}.pt"))
        self.passes = 0

    def on_train_end(self) -> None:
        weights = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
        torch.save(weights, os.path.join(self.out_dir, f"final_rank{self.global_rank}.pt"))


def module_kwargs() -> dict:
    return dict(method=method_config(), model=ModelConfig(name_or_path="tiny"),
                rollout=RolloutConfig(max_new_tokens=16, max_total_tokens=32), sandbox=SandboxConfig(workers=1),
                tokenizer=load_tiny_tokenizer())


def fixed_samples(module: GRPOModule) -> list[Sample]:
    """Four episode responses after one prompt, advantages -1/+1 per group, then one step-level response (-1);
    old log-probs = the starting policy's."""
    tok = module.tokenizer
    g = torch.Generator().manual_seed(0)
    prompt = tok.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    temperature = module.rollout_cfg.temperature or 1.0
    samples = []
    for i, n in enumerate((*RESPONSE_LENGTHS, STEP_LENGTH)):
        resp = torch.randint(10, 500, (n,), generator=g).tolist()
        with torch.no_grad():
            ids = torch.tensor([prompt + resp])                                   # [1, P+n]
            logits = module.policy(input_ids=ids).logits[0, len(prompt) - 1:-1]    # [n, V]
            old = core.token_logprobs(logits, torch.tensor(resp), temperature=temperature)
        level = "episode" if i < len(RESPONSE_LENGTHS) else "step"
        samples.append(Sample(prompt, resp, [1] * n, old.tolist(), [0.0] * n, 1.0 if i % 2 else -1.0, level,
                              group=i // 2))
    return samples


def full_batch_gradient(module: GRPOModule, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """The whole batch's gradient in one process (no process group) at ``module``'s current weights."""
    batch = collate_samples(samples, module.tokenizer.pad_token_id)
    counts = {lv: module.global_counts(batch, lv) for lv in ("episode", "step")}
    module.policy.zero_grad(set_to_none=True)
    module.micro_batch_loss(batch, counts)[0].backward()
    return {n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None}


def one_process_reference(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """The weights after the same number of full-batch AdamW steps in one process."""
    ref = GRPOModule(**module_kwargs())
    ref.configure_model()
    m = ref.method_cfg
    opt = torch.optim.AdamW(ref.trainable_parameters(), lr=m.lr, weight_decay=m.weight_decay, betas=tuple(m.betas))
    for _ in range(len(SPLITS) * PPO_EPOCHS):
        opt.zero_grad(set_to_none=True)
        full_batch_gradient(ref, samples)
        opt.step()
    return {n: p.detach().clone() for n, p in ref.policy.named_parameters()}


def rank_local_token_mean_gradient(samples: list[Sample], split: tuple[list[int], ...]) -> torch.Tensor:
    """The flat gradient DDP would apply if each rank normalised by its own tokens (the bug this file guards)."""
    module = GRPOModule(**module_kwargs())
    module.configure_model()
    for idx in split:
        batch = collate_samples([samples[i] for i in idx], module.tokenizer.pad_token_id)
        counts = {lv: module.global_counts(batch, lv) for lv in ("episode", "step")}
        module.micro_batch_loss(batch, counts)[0].backward()      # sum over ranks = world_size x DDP's average
    return torch.cat([p.grad.flatten() for p in module.policy.parameters()])


def assert_one_process_gradient(ref: GRPOModule, rec: dict, samples: list[Sample], where: tuple) -> None:
    """A rank's recorded step (its gathered ``grads`` and the ``weights`` they were taken at) has the one-process
    full-batch gradient at those very weights, 1e-5 relative per tensor. (Comparing with an independent one-process
    trajectory instead lets AdamW amplify fp32 noise across steps: 1e-3 at step 2.)"""
    with torch.no_grad():
        for name, p in ref.policy.named_parameters():
            p.copy_(rec["weights"][name])
    want = full_batch_gradient(ref, samples)
    assert rec["grads"].keys() == want.keys() and want
    for name, g in rec["grads"].items():
        assert relative_error(g, want[name]) < 1e-5, (*where, name)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| over the whole tensor. A gradient taken at the same weights agrees to fp32 summation
    order (~1e-6); a halved gradient or a rank-local token-mean is off by 0.1 or more."""
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def _one_item(batch):
    return batch


def test_split_batch_under_ddp_gives_the_one_process_gradient_even_when_ranks_are_uneven(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    probe = GRPOModule(**module_kwargs())
    probe.configure_model()
    samples = fixed_samples(probe)
    module = FixedRolloutGRPO(samples, str(tmp_path), **module_kwargs())
    prompts = torch.utils.data.DataLoader(list(range(WORLD * len(SPLITS))), batch_size=1, collate_fn=_one_item)
    # a rank that skipped a gradient sync would leave the other blocked in a collective: gloo gives up after
    # the timeout, the rank raises, and fit raises here instead of hanging the suite (measured with the padding
    # passes removed: "Timed out waiting 30000ms" inside backward, the test fails after ~45 s)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=30))
    # Lightning counts optimiser steps (PPO_EPOCHS per update) in max_steps under manual optimisation
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=len(SPLITS) * PPO_EPOCHS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=prompts)

    ref_final = one_process_reference(samples)
    ref = GRPOModule(**module_kwargs())
    ref.configure_model()
    n_tokens = float(sum(RESPONSE_LENGTHS))
    for step in range(len(SPLITS) * PPO_EPOCHS):
        split = SPLITS[step // PPO_EPOCHS]
        seen = [torch.load(tmp_path / f"step{step}_rank{r}.pt") for r in range(WORLD)]
        for rank, rec in enumerate(seen):
            # each level's token-mean denominator counts both ranks' tokens (19 and 6), not this rank's own
            assert rec["counts"]["episode"] == (n_tokens, 4.0), (step, rank)
            assert rec["counts"]["step"] == (float(STEP_LENGTH), 1.0), (step, rank)
            # every rank joins as many gradient syncs as the busiest rank has micro-batches
            assert rec["passes"] == max(len(s) for s in split), (step, rank)
            # the one-process full-batch gradient at the very weights this step was taken at (comparing with an
            # independent one-process trajectory instead lets AdamW amplify fp32 noise across steps: 1e-3 at step 2)
            assert_one_process_gradient(ref, rec, samples, (step, rank))
        for name, g in seen[0]["grads"].items():
            assert torch.equal(g, seen[1]["grads"][name])   # DDP synced: the ranks step with the same gradient
    # the check above can tell: normalising by each rank's own 8 / 11 tokens instead of 19 moves the gradient a lot
    step0 = torch.load(tmp_path / "step0_rank0.pt")["grads"]
    names = [n for n, _ in probe.policy.named_parameters()]
    assert relative_error(rank_local_token_mean_gradient(samples, SPLITS[0]),
                          torch.cat([step0[n].flatten() for n in names])) > 0.1
    # train/* metrics describe both ranks: averaged, with a key one rank lacks counted as 0 there
    for update in range(len(SPLITS)):
        logged = [torch.load(tmp_path / f"metrics{update}_rank{r}.pt") for r in range(WORLD)]
        # (rank 1 rolled out nothing in the last split, so its reward mean is NaN there: compare the rest)
        assert {k: v for k, v in logged[0].items() if v == v} == {k: v for k, v in logged[1].items() if v == v}
        assert logged[0]["probe"] == 0.5 and logged[0]["only_rank1"] == 2.0
    start = dict(probe.policy.named_parameters())
    for rank in range(WORLD):
        final = torch.load(tmp_path / f"final_rank{rank}.pt")
        for name, w in final.items():
            # compare what the six steps moved (the weights themselves dwarf a 1e-3 step)
            assert relative_error(w - start[name].detach(), ref_final[name] - start[name].detach()) < 1e-2, name


class MiniBatchRecordingGRPO(FixedRolloutGRPO):
    """Also records which of the fixed samples each optimizer step's mini-batch held on this rank."""

    def make_experience(self, records):
        self.current_ids = SPLITS[self.updates][self.global_rank]
        return super().make_experience(records)

    def mini_batch_step(self, batch, rows, opt):
        self.step_ids = [self.current_ids[r] for r in rows]
        return super().mini_batch_step(batch, rows, opt)

    def on_before_optimizer_step(self, optimizer) -> None:
        torch.save(self.step_ids, os.path.join(self.out_dir, f"ids{self.global_step}_rank{self.global_rank}.pt"))
        super().on_before_optimizer_step(optimizer)


def test_mini_batches_under_ddp_give_the_one_process_gradient_of_each_mini_batch_positive_nll_included(tmp_path):
    """issue 18: a round split into 2 mini-batches of whole groups on each rank (2 optimizer steps a round), THOR's
    NLL normalised by the positive-advantage tokens of the mini-batch over both ranks: each step's synced gradient
    is the one-process gradient of the union of both ranks' shares of that mini-batch."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from tirl.config.schema import LossConfig

    torch.set_num_threads(1)
    kwargs = module_kwargs()
    kwargs["method"] = MethodConfig(lr=LR, micro_batch_size=1, max_grad_norm=1e6, group_size=2, rollout_batch_size=4,
                                    mini_batch_size=2, loss=LossConfig(nll_coef=0.5, nll_norm="positive"))
    probe = GRPOModule(**kwargs)
    probe.configure_model()
    samples = fixed_samples(probe)
    module = MiniBatchRecordingGRPO(samples, str(tmp_path), **kwargs)
    prompts = torch.utils.data.DataLoader(list(range(WORLD * len(SPLITS))), batch_size=1, collate_fn=_one_item)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=30))
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=len(SPLITS) * 2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=prompts)

    ref = GRPOModule(**kwargs)
    ref.configure_model()
    checked = 0
    for step in range(len(SPLITS) * 2):
        ids = [torch.load(tmp_path / f"ids{step}_rank{r}.pt") for r in range(WORLD)]
        union = sorted(ids[0] + ids[1])
        split = SPLITS[step // 2]
        for rank in range(WORLD):   # whole groups: a group's samples on this rank travel together
            assert all((i ^ 1) in ids[rank] for i in ids[rank] if i < 4 and (i ^ 1) in split[rank]), (step, ids)
            assert set(ids[rank]) <= set(split[rank])
        rec = torch.load(tmp_path / f"step{step}_rank0.pt")
        if not union:
            continue
        with torch.no_grad():
            for name, p in ref.policy.named_parameters():
                p.copy_(rec["weights"][name])
        batch = collate_samples([samples[i] for i in union], ref.tokenizer.pad_token_id)
        counts = {lv: ref.global_counts(batch, lv) for lv in ("episode", "step")}
        counts["positive"] = (ref.global_positive_tokens(batch), 0.0)
        ref.policy.zero_grad(set_to_none=True)
        ref.micro_batch_loss(batch, counts)[0].backward()
        for name, p in ref.policy.named_parameters():
            if p.grad is not None and name in rec["grads"]:
                assert relative_error(rec["grads"][name], p.grad) < 1e-5, (step, name)
        checked += 1
    # both mini-batches of each round together hold the round: every sample of the split, once
    for r in range(len(SPLITS)):
        seen = [i for step in (2 * r, 2 * r + 1) for rank in range(WORLD)
                for i in torch.load(tmp_path / f"ids{step}_rank{rank}.pt")]
        assert sorted(seen) == sorted(SPLITS[r][0] + SPLITS[r][1])
    assert checked >= 5


SFT_LOSS_TOKENS = [2, 151, 5, 40, 9]   # 5 samples, batch 1 x 2 accumulated x 2 ranks: a step of 4, then one of 1


def test_sft_under_ddp_with_accumulation_gives_the_one_process_gradient_of_each_step(tmp_path):
    """Step 1: each rank trains on 2 of the 4 samples (very different token counts). Step 2: the epoch's last sample
    alone, one rank gets it and the other a micro-batch without loss tokens (to join the gradient sync). Each step's
    synced gradient must be the one-process gradient of sum(NLL over the step's samples) / (their loss tokens)."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from sft_grads import (
        RecordingSFT,
        datamodule,
        examples_with_loss_tokens,
        full_batch_gradient,
        relative_error,
        sft_kwargs,
    )

    torch.set_num_threads(1)
    examples = examples_with_loss_tokens(SFT_LOSS_TOKENS)
    module = RecordingSFT(str(tmp_path), **sft_kwargs())
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=30))
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=2, accumulate_grad_batches=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule(examples, batch_size=1))

    ref = RecordingSFT(str(tmp_path), **sft_kwargs())
    ref.configure_model()
    tokens_per_step = []
    for step in range(2):
        recs = [torch.load(tmp_path / f"step{step}_rank{r}.pt") for r in range(WORLD)]
        batches = [b for rec in recs for b in rec["batches"]]
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        tokens_per_step.append(sorted(c for c in counts if c))
        assert [len(rec["batches"]) for rec in recs] == [2 - step, 2 - step]   # ranks join the same syncs
        want = full_batch_gradient(ref, recs[0]["weights"], batches)
        for rank, rec in enumerate(recs):
            assert relative_error(rec["grads"], want) < 1e-4, (step, rank)
    # every sample once: 4 in the first step (2 micro-batches on each rank), the last one alone in the second (one
    # rank's micro-batch is empty)
    assert sorted(tokens_per_step[0] + tokens_per_step[1]) == sorted(SFT_LOSS_TOKENS)
    assert len(tokens_per_step[0]) == 4 and len(tokens_per_step[1]) == 1


def test_tiny_dcore_run_under_two_process_ddp_trains_and_logs(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "src" / "train.py"), "model=tiny", "method=dcore", "data=synthetic_toolcall",
           "hardware=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.max_steps=2", "trainer.val_check_interval=2", "data.val_size=2", "validate_before_fit=false",
           "test=false", "method.group_size=2", "method.rollout_batch_size=4", "method.micro_batch_size=2",  # 2 a rank
           "rollout.max_new_tokens=16", "rollout.max_total_tokens=48", "rollout.max_tool_rounds=1",
           "sandbox.workers=1", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false",
           f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output          # a second process really joined
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    train = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in train] == [0, 1]
    # D-CORE's KL term means every step updates: the loss, grad norm and KL come from the DDP backward passes
    for r in train:
        assert float(r.get("train/skipped_update") or 0.0) == 0.0
        assert float(r["train/grad_norm"]) > 0 and float(r["train/kl"]) >= 0
    assert [r for r in rows if r.get("val/acc")], "validation under DDP logged no val/acc"
    # per-category accuracy goes through the rank agreement too: present, and each value a fraction
    by_kind = {k: float(r[k]) for r in rows for k in r if k.startswith("val/acc/") and r[k]}
    assert by_kind and set(by_kind) <= {f"val/acc/{c}" for c in CATEGORIES}
    assert all(0.0 <= v <= 1.0 for v in by_kind.values())
    # the samples table is rank 0's (method.log_samples=4 rows a step, one header), not every rank's appended
    samples = list(csv.reader((run_dir / "csv" / "train_samples.csv").open()))
    assert samples[0][0] == "step" and [row[0] for row in samples[1:]] == ["0"] * 4 + ["1"] * 4   # metrics.csv's steps
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
