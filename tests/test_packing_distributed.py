"""Packed updates with token-budget micro-batches over 2 real CPU ranks (gloo): DDP and FSDP2 (Lightning's
``ModelParallelStrategy``) each give, at every optimizer step, the one-process gradient of the whole batch read the
padded way — global token-mean over both ranks, zero-weighted passes where a rank has fewer micro-batches (or only
the empty batch). Fixed rollouts (``test_ddp_cpu.FixedRolloutGRPO``), no generation; the runs are in
``packing_runs.py``. A rank stuck in a collective raises after the 30 s process-group timeout, and the FSDP script
is killed after 150 s, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packing_runs import BUDGET, EPOCHS, fit, strategy
from test_ddp_cpu import SPLITS, WORLD, assert_one_process_gradient, fixed_samples, module_kwargs

from tirl.config.schema import MethodConfig
from tirl.modules.grpo import GRPOModule
from tirl.rl.schedule import token_micro_batches

pytestmark = pytest.mark.distributed


def check_against_one_process(out_dir: Path, sharded: bool) -> None:
    probe = GRPOModule(**module_kwargs())
    probe.configure_model()
    samples = fixed_samples(probe)
    ref_kwargs = module_kwargs()   # the reference reads the whole batch padded, in one micro-batch
    ref_kwargs["method"] = MethodConfig(lr=1e-3, group_size=2, packing=False, micro_batch_size=len(samples))
    ref = GRPOModule(**ref_kwargs)
    ref.configure_model()
    lengths = [len(s.context) + len(s.response) for s in samples]
    for step in range(len(SPLITS) * EPOCHS):
        seen = [torch.load(out_dir / f"step{step}_rank{r}.pt") for r in range(WORLD)]
        split = SPLITS[step // EPOCHS]
        plans = [token_micro_batches([lengths[i] for i in share], BUDGET) for share in split]
        for rank, rec in enumerate(seen):
            assert rec["sharded"] == sharded
            assert all(t <= BUDGET for t in rec["mb_tokens"]), (step, rank, rec["mb_tokens"])
            # this rank's real passes: its share's balanced micro-batches; then zero-weighted ones up to the busiest
            mine = plans[rank]
            assert rec["mb_tokens"][:len(mine)] == [sum(lengths[split[rank][i]] for i in mb) for mb in mine]
            assert rec["passes"] == max(map(len, plans)) >= 2, (step, rank)
            assert_one_process_gradient(ref, rec, samples, (step, rank))


def test_packed_token_budget_update_under_two_ddp_ranks_gives_the_one_process_gradient(tmp_path):
    torch.set_num_threads(1)
    fit(str(tmp_path), strategy("ddp"))
    check_against_one_process(tmp_path, sharded=False)


def test_packed_token_budget_update_under_two_fsdp_ranks_gives_the_one_process_gradient(tmp_path):
    script = Path(__file__).with_name("packing_runs.py")
    done = subprocess.run([sys.executable, str(script), "fsdp", str(tmp_path)], capture_output=True, text=True,
                          timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    check_against_one_process(tmp_path, sharded=True)      # FSDP2 shards the policy; gradients gathered to compare
