"""What the 2-rank sharded-checkpoint tests run through ``src/train.py`` (``method.module._target_=sharded_run.…``).

``RandomRolloutGRPO`` is the real ``GRPOModule`` (real datamodule, behaviour log-probs, update, checkpoints) whose
rollouts need no generation: each rank draws its response tokens from the global torch RNG and its rewards from
Python's ``random`` and numpy, the three streams a real rollout consumes. So the losses depend on every rank's RNG
state and on the data position, which an exact resume must all restore, and no rank waits for another in HF
``generate`` over the sharded policy. Each rank appends what it saw at every step to
``$TIRL_RECORD_DIR/rank<r>.jsonl``.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from tirl.modules.grpo import GRPOModule
from tirl.rollout.types import Trajectory


class RandomRolloutGRPO(GRPOModule):
    @property
    def tool_loop(self):
        return None

    def rollout_groups(self, records, group_size, loop=None):
        trajs = []
        for gi, record in enumerate(records):
            prompt = self.encode_prompt(record)
            for _ in range(group_size):
                n = int(torch.randint(2, 9, ()).item())
                response = torch.randint(10, 500, (n,)).tolist()
                trajs.append(Trajectory(prompt, response, [1] * n, [0.0] * n, [0.0] * n, stop_reason="eos",
                                        meta={"group": gi, "id": record.get("id"), "answer": record.get("answer"),
                                              "task": record.get("task")}))
        self._drawn = [(t.meta["id"], t.response_ids) for t in trajs]
        torch.rand(self.global_rank)   # ranks draw different amounts (uneven lengths): their streams drift apart
        return trajs

    def score(self, trajs, records):
        rewards = [float(random.random() < 0.5) + float(np.random.rand()) for _ in trajs]
        [random.random() for _ in range(self.global_rank)], np.random.rand(self.global_rank)
        return rewards, [0.0] * len(trajs)

    def mean_over_ranks(self, metrics):
        out_dir = os.environ.get("TIRL_RECORD_DIR")
        if out_dir:
            row = {"step": self.global_step, "rank": self.global_rank, "drawn": getattr(self, "_drawn", None),
                   **{k: float(v) for k, v in metrics.items() if k in ("loss", "pg_loss", "grad_norm", "reward_mean")}}
            with open(os.path.join(out_dir, f"rank{self.global_rank}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        return super().mean_over_ranks(metrics)

    def on_train_end(self) -> None:
        # the trained policy as FSDP itself gathers it (a collective), for the export tests to compare against
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        out_dir = os.environ.get("TIRL_RECORD_DIR")
        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if out_dir and self.global_rank == 0:
            torch.save(full, os.path.join(out_dir, "final_policy.pt"))
