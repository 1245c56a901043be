"""Runs for tests/test_packing_distributed.py: a packed, token-budget GRPO update of fixed rollouts over 2 CPU
ranks. ``python tests/packing_runs.py fsdp OUT_DIR`` runs the FSDP2 case as a script: Lightning's
``ModelParallelStrategy`` starts the other rank by re-running the command line, which must therefore be this script
(not pytest)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from test_ddp_cpu import SPLITS, WORLD, FixedRolloutGRPO, _one_item, fixed_samples, module_kwargs

from tirl.config.schema import MethodConfig
from tirl.models.sharding import is_sharded
from tirl.modules.grpo import GRPOModule

BUDGET = 30   # tokens per micro-batch: the fixed samples are 11-15 tokens, so 1-2 rows each, 2 passes on a busy rank


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly FSDP-sharded DTensor) parameter or gradient."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class BudgetRecordingGRPO(FixedRolloutGRPO):
    """Records full (unsharded) gradients and weights, and the tokens of each micro-batch this rank ran."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.share_contexts = False   # the samples share a prompt and are short: the shared pass would be cheaper

    def micro_batch_loss(self, mb, counts):
        self.mb_tokens = getattr(self, "mb_tokens", []) + [int(mb.attention_mask.sum())]
        return super().micro_batch_loss(mb, counts)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = {n: _full(p.grad) for n, p in self.policy.named_parameters() if p.grad is not None}
        weights = {n: _full(p) for n, p in self.policy.named_parameters()}
        record = {"grads": grads, "weights": weights, "passes": self.passes, "mb_tokens": self.mb_tokens,
                  "sharded": is_sharded(self.policy)}
        torch.save(record, os.path.join(self.out_dir, f"step{self.global_step}_rank{self.global_rank}.pt"))
        self.passes, self.mb_tokens = 0, []

    def on_train_end(self) -> None:
        pass


EPOCHS = 2


def fit(out_dir: str, strategy) -> None:
    """Train len(SPLITS) updates of EPOCHS steps; each rank writes step{k}_rank{r}.pt into ``out_dir``."""
    import lightning.pytorch as pl

    torch.set_num_threads(1)
    kwargs = module_kwargs()
    kwargs["method"] = MethodConfig(lr=1e-3, group_size=2, max_grad_norm=1e6, ppo_epochs=EPOCHS, packing=True,
                                    micro_batch_tokens=BUDGET)
    probe = GRPOModule(**module_kwargs())
    probe.configure_model()
    module = BudgetRecordingGRPO(fixed_samples(probe), out_dir, **kwargs)
    prompts = torch.utils.data.DataLoader(list(range(WORLD * len(SPLITS))), batch_size=1, collate_fn=_one_item)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=len(SPLITS) * EPOCHS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=prompts)


def strategy(name: str):
    """The 2-rank strategy; a rank stuck in a collective raises after 30 s."""
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=30))
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1, process_group_backend="gloo",
                                 timeout=timedelta(seconds=30))


if __name__ == "__main__":
    fit(sys.argv[2], strategy(sys.argv[1]))
