"""The training side of tests/test_fsdp_cpu.py's gradient tests, run as a script so Lightning can start its second
rank by re-running it: ``python tests/fsdp_worker.py {full|lora} OUT_DIR``; and ``gather OUT_DIR`` under torchrun, which
checks ``tirl.models.sharding.full_weights`` alone.

The real ``GRPOModule.training_step``/``update`` under ``FSDP2Strategy`` (2 CPU ranks, gloo, fp32, KL term on); only
``make_experience`` is replaced (``test_ddp_cpu.FixedRolloutGRPO``: uneven shares, one rank with nothing). Writes, per
optimizer step, the full (gathered) gradient and the weights it was taken at, and at the end the per-step metrics, how
the KL reference is held, and (LoRA) the reference's and the policy's logits on a fixed input.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta

import torch
from test_ddp_cpu import PPO_EPOCHS, SPLITS, WORLD, FixedRolloutGRPO, _one_item, module_kwargs

KL_COEF = 0.05
MICRO_BATCH = 2
PROBE_IDS = [[5, 17, 300, 42, 9, 101, 77, 250]]


def worker_kwargs(mode: str) -> dict:
    """The module's arguments for ``mode``: a full fine-tune or a LoRA adapter, both with a k3 KL term."""
    from tirl.config.schema import LoraConfig, LossConfig

    kwargs = module_kwargs()
    # micro-batches of 2: a rank reads a shared prompt once where its pair shares one, not where it holds 1 or 0 rows
    kwargs["method"] = dataclasses.replace(kwargs["method"], loss=LossConfig(kl_coef=KL_COEF),
                                           micro_batch_size=MICRO_BATCH)
    if mode == "lora":
        kwargs["model"] = dataclasses.replace(kwargs["model"], lora=LoraConfig(enabled=True, r=4, alpha=8))
    return kwargs


def gathered(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), a plain tensor as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class FSDPRecordingGRPO(FixedRolloutGRPO):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_metrics: list[dict] = []

    def update(self, batch, groups=None):
        out = super().update(batch, groups)
        self.step_metrics += self.last_step_metrics
        return out

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = {n: gathered(p.grad) for n, p in self.policy.named_parameters() if p.grad is not None}
        weights = {n: gathered(p) for n, p in self.policy.named_parameters()}
        record = {"grads": grads, "weights": weights, "counts": dict(self.seen_counts), "passes": self.passes}
        if self.global_rank == 0:
            torch.save(record, os.path.join(self.out_dir, f"step{self.global_step}.pt"))
        self.passes = 0

    def on_train_end(self) -> None:
        from torch.distributed.tensor import DTensor

        from tirl.models.reference import reference_model
        from tirl.models.sharding import is_sharded

        out = {"metrics": self.step_metrics, "policy_sharded": is_sharded(self.policy),
               "sampler": self.trainer.strategy.distributed_sampler_kwargs}
        if self.frozen_ref is not None:
            params = list(self.frozen_ref.parameters())
            out["ref_sharded"] = is_sharded(self.frozen_ref) and all(isinstance(p, DTensor) for p in params)
            out["ref_local_fraction"] = sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)
            out["ref_weights"] = {n: gathered(p) for n, p in self.frozen_ref.named_parameters()}
        ids = torch.tensor(PROBE_IDS)
        with torch.no_grad():
            out["policy_logits"] = self.policy(input_ids=ids).logits.detach().clone()
            with reference_model(self.policy, self.frozen_ref) as ref:
                out["ref_logits"] = ref(input_ids=ids).logits.detach().clone()
        torch.save(out, os.path.join(self.out_dir, f"final_rank{self.global_rank}.pt"))


def main(mode: str, out_dir: str) -> None:
    import lightning.pytorch as pl
    from test_ddp_cpu import fixed_samples

    from tirl.models.sharding import FSDP2Strategy
    from tirl.modules.grpo import GRPOModule

    torch.set_num_threads(1)
    kwargs = worker_kwargs(mode)
    probe = GRPOModule(**kwargs)
    probe.configure_model()
    module = FSDPRecordingGRPO(fixed_samples(probe), out_dir, **kwargs)
    prompts = torch.utils.data.DataLoader(list(range(WORLD * len(SPLITS))), batch_size=1, collate_fn=_one_item)
    # a rank left waiting in a collective fails after 30 s instead of hanging (the test's timeout is the backstop)
    strategy = FSDP2Strategy(process_group_backend="gloo", timeout=30)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=len(SPLITS) * PPO_EPOCHS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=prompts)


def gather(out_dir: str) -> None:
    """Inside ``full_weights`` each rank runs a different number of forwards (1 on rank 0, 3 on rank 1) with no
    collective; the logits are the unsharded model's; afterwards every parameter is a shard again and forwards
    reshard as before (a later training forward and backward work)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tirl.models.load import load_policy
    from tirl.models.sharding import full_weights, shard_policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    ids = torch.tensor(PROBE_IDS)
    whole = load_policy("tiny").eval()
    with torch.no_grad():
        want = whole(input_ids=ids).logits
    model = shard_policy(load_policy("tiny").eval(), init_device_mesh("cpu", (2,)))
    out = {}
    with torch.no_grad(), full_weights(model):
        out["inside_plain"] = not any(isinstance(p, DTensor) for p in model.parameters())
        for _ in range(1 + 2 * rank):
            logits = model(input_ids=ids).logits
        out["logits_err"] = (logits - want).abs().max().item()
    out["after_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    model.train()
    model(input_ids=ids).logits.sum().backward()
    # the first block reshards after its forward again (only the last block keeps its weights for backward)
    out["block0_sharded_after_forward"] = all(isinstance(p, DTensor) for p in model.model.layers[0].parameters())
    out["grads"] = all(isinstance(p.grad, DTensor) for p in model.parameters())
    torch.save(out, os.path.join(out_dir, f"gather_rank{rank}.pt"))
    # gloo's barrier first waits for every collective still in flight (the backward's last gradient reduction):
    # leaving with one pending aborted a rank ~1 run in 10 ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    # Everything this test checks is saved. A plain interpreter exit still aborts a rank now and then on a loaded
    # machine ("terminate called without an active exception": a torch C++ thread still joinable at static
    # destruction, after the process group is gone); leave without running those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "gather":
        gather(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2])
