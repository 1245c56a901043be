"""Sharded RL training (``hardware=fsdp``: torch FSDP2 through ``tirl.models.sharding.FSDP2Strategy``) on 2 CPU ranks
(gloo, fp32). The gradient tests drive the real ``training_step``/``update`` (``tests/fsdp_worker.py``; only
``make_experience`` is replaced): each optimizer step's gathered gradient is the one-process gradient of the whole
batch, KL term included, with uneven shares and a rank holding nothing; the logged grad norm is the global one. The
end-to-end tests run ``src/train.py`` with GRPO, D-CORE and THOR, whose ranks generate different numbers of tokens,
tool rounds and resamples (the hang this guards: a rank in a sharded forward while the other waits elsewhere).

Each run is a process group with a deadline: gloo fails a rank that waits 30 s in a collective, and the group is
killed at the test's timeout, so a hang is a failure.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch

from tirl.config import CONFIG_DIR

pytestmark = pytest.mark.distributed

REPO = CONFIG_DIR.parent
TESTS = REPO / "tests"


def run_ranks(cmd: list[str], timeout: float) -> str:
    """Run ``cmd`` (which starts its own ranks) in a new process group; on timeout kill the whole group and fail.
    Returns stdout + stderr; a non-zero exit fails the test with the output's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the launcher and every rank it started
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:3])} still running after {timeout:.0f} s (a rank hung):\n{output[-3000:]}")
    if proc.returncode != 0:   # the launcher's summary comes last; the ranks' own errors are what say why
        errors = "\n".join(line for line in output.splitlines() if "Error" in line or "error" in line)
        pytest.fail(f"exit {proc.returncode}; error lines:\n{errors[-4000:]}\n--- tail:\n{output[-3000:]}")
    return output


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def one_process_module(mode: str, start: dict[str, torch.Tensor]):
    """The worker's module in this process, unsharded, its KL reference the starting weights ``start``."""
    from fsdp_worker import worker_kwargs

    from tirl.models.reference import make_frozen_reference
    from tirl.modules.grpo import GRPOModule

    ref = GRPOModule(**worker_kwargs(mode))
    ref.configure_model()
    load(ref.policy, start)
    ref.frozen_ref = make_frozen_reference(ref.policy, ref.method_cfg.loss.kl_coef)   # None for LoRA: adapter off
    return ref


def load(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])


def test_full_weights_lets_ranks_run_different_forwards_then_shards_again(tmp_path):
    """``full_weights`` (what every rollout phase runs in): one gather, then rank 0 runs 1 forward and rank 1 runs 3
    without waiting on each other, with the unsharded model's logits; afterwards the parameters are shards again,
    forwards reshard again, and a training step's gradients are sharded."""
    run_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(TESTS / "fsdp_worker.py"), "gather", str(tmp_path)], timeout=90)
    for rank in range(2):
        out = torch.load(tmp_path / f"gather_rank{rank}.pt")
        assert out["inside_plain"] and out["logits_err"] < 1e-5
        assert out["after_sharded"] and out["block0_sharded_after_forward"] and out["grads"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sharded_update_gives_the_one_process_gradient_with_the_kl_reference(mode, tmp_path):
    """Full fine-tune (frozen reference copied before sharding, sharded itself) and LoRA (reference = adapter off on
    the sharded model): every optimizer step's gradient over 2 FSDP ranks equals the one-process gradient of the
    whole batch at the same weights (fp32, 1e-5 relative), and ``train/grad_norm`` is its global norm."""
    from fsdp_worker import MICRO_BATCH, PROBE_IDS
    from test_ddp_cpu import (
        PPO_EPOCHS,
        RESPONSE_LENGTHS,
        SPLITS,
        STEP_LENGTH,
        fixed_samples,
        full_batch_gradient,
    )

    torch.set_num_threads(1)
    run_ranks([sys.executable, str(TESTS / "fsdp_worker.py"), mode, str(tmp_path)], timeout=150)

    final = [torch.load(tmp_path / f"final_rank{r}.pt") for r in range(2)]
    start = torch.load(tmp_path / "step0.pt")["weights"]
    ref = one_process_module(mode, start)
    samples = fixed_samples(ref)
    for step in range(len(SPLITS) * PPO_EPOCHS):
        rec = torch.load(tmp_path / f"step{step}.pt")
        assert rec["counts"]["episode"] == (float(sum(RESPONSE_LENGTHS)), 4.0)
        assert rec["counts"]["step"] == (float(STEP_LENGTH), 1.0)
        # padding passes join in: as many as the busiest rank's micro-batches
        assert rec["passes"] == max(-(-len(s) // MICRO_BATCH) for s in SPLITS[step // PPO_EPOCHS])
        load(ref.policy, rec["weights"])
        want = full_batch_gradient(ref, samples)
        assert rec["grads"].keys() == want.keys() and want
        for name, g in rec["grads"].items():
            assert relative_error(g, want[name]) < 1e-5, (step, name)
        norm = torch.cat([g.double().flatten() for g in want.values()]).norm().item()   # fp32 sums drift 1e-4
        for rank in range(2):   # the clip saw (and both ranks logged) the norm over both ranks' shards
            assert final[rank]["metrics"][step]["grad_norm"] == pytest.approx(norm, rel=1e-5), (step, rank)
    for rank in range(2):   # held-out prompts are split over both ranks (the mesh is data parallel over all)
        assert final[rank]["sampler"] == {"num_replicas": 2, "rank": rank} and final[rank]["policy_sharded"]
    kl = [m["kl"] for m in final[0]["metrics"]]
    assert kl[0] <= 1e-6 and max(kl[1:]) > 1e-3   # the reference is the start; the policy then moves away from it
    if mode == "lora":
        assert set(want) == {n for n in want if "lora_" in n}   # only the adapter trains
        # the adapter switched off on the sharded model is exactly the starting model, after training too
        base = one_process_module(mode, start)
        with torch.no_grad():
            start_logits = base.policy(input_ids=torch.tensor(PROBE_IDS)).logits
        for rank in range(2):
            assert torch.allclose(final[rank]["ref_logits"], start_logits, atol=1e-5)
            assert not torch.allclose(final[rank]["policy_logits"], start_logits, atol=1e-3)
    else:
        for rank in range(2):   # the full fine-tune's reference is split over the ranks, not a copy on each
            assert final[rank]["ref_sharded"] and final[rank]["ref_local_fraction"] == pytest.approx(0.5, abs=0.02)
            assert all(torch.equal(w, start[n]) for n, w in final[rank]["ref_weights"].items())


TINY_RUN = ["model=tiny", "hardware=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
            "+trainer.strategy.process_group_backend=gloo", "trainer.strategy.timeout=30",
            "test=false", "sandbox.workers=1", "callbacks.progress_bar.refresh_rate=0",
            "trainer.enable_model_summary=false", "data.val_size=2", "method.val_samples=1"]


def train_run(tmp_path, *overrides: str, timeout: float = 150) -> tuple[str, list[dict]]:
    """A 2-rank ``src/train.py`` run; its output and metrics.csv rows."""
    run_dir = tmp_path / "run"
    output = run_ranks([sys.executable, str(REPO / "src" / "train.py"), *TINY_RUN, *overrides,
                        f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path / 'logs'}"], timeout)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output   # a second rank really joined
    return output, list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))


def trained_steps(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("train/grad_norm")]


def test_thor_run_with_step_level_and_self_correction_finishes_on_two_sharded_ranks(tmp_path):
    """THOR: tool rounds, step-level resampling and self-correction differ per rank, old log-probs recomputed, a
    held-out validation in between; the sampled lengths differ across ranks."""
    _, rows = train_run(tmp_path, "method=thor", "data=synthetic_math", "validate_before_fit=false",
                        "trainer.max_steps=2", "trainer.val_check_interval=1", "method.old_log_probs=recompute",
                        "rollout.self_correction.enabled=true", "method.group_size=4", "method.rollout_batch_size=4",
                        "method.micro_batch_size=4")
    train = trained_steps(rows)
    assert len(train) == 2
    assert all(float(r["train/grad_norm"]) > 0 for r in train if float(r.get("train/skipped_update") or 0) == 0)
    assert any(float(r.get("train/step_level/samples") or 0) > 0 for r in train), "no step-level samples were made"
    assert [r for r in rows if r.get("val/acc")], "held-out rollouts under FSDP logged no val/acc"


def test_dcore_full_finetune_with_kl_and_grpo_lora_on_a_hybrid_mesh_finish_on_two_sharded_ranks(tmp_path):
    """D-CORE: full fine-tune with a k3 KL term, so a sharded frozen reference, made after the validation before fit
    had sharded the policy; DA-GRPO entropies from the recompute pass. Then GRPO with a LoRA adapter (sampled
    through the merged-LoRA path over the gathered weights), activation checkpointing and multinode's hybrid
    (replicate x shard) mesh, one node of 2 ranks."""
    _, rows = train_run(tmp_path / "dcore", "method=dcore", "data=synthetic_toolcall", "validate_before_fit=true",
                        "trainer.max_steps=4", "method.old_log_probs=recompute", "method.group_size=2",
                        "method.rollout_batch_size=4", "method.mini_batch_size=2", "method.micro_batch_size=2",
                        "rollout.max_tool_rounds=1")
    train = trained_steps(rows)
    assert train and all(float(r["train/grad_norm"]) > 0 and float(r["train/kl"]) >= 0 for r in train)
    assert all(r.get("train/rollout_mismatch/kl_k3") for r in train)   # the recompute pass ran sharded
    output, rows = train_run(tmp_path / "grpo", "method=grpo", "data=synthetic_math", "validate_before_fit=false",
                             "model.fsdp.sharding=hybrid", "model.lora.enabled=true",
                             "model.gradient_checkpointing=true", "trainer.max_steps=2", "method.group_size=2", "method.rollout_batch_size=2",
                             "method.mini_batch_size=2", "method.micro_batch_size=2")
    assert "mesh (replicate=1, shard=2)" in output
    assert len([r for r in rows if r.get("train/reward_mean")]) == 2
