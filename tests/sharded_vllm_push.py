"""Two gloo ranks, each with an FSDP2-sharded tiny policy and its own in-process vLLM engine (what ``rollout=vllm``
does under ``hardware=fsdp``): run as ``python tests/sharded_vllm_push.py <out_dir> <port>`` by
``test_fsdp_checkpoints.py``, which asserts on what each rank writes to ``<out_dir>/rank<r>.json``.

For a full and then a LoRA policy, each rank records the engine's log-probs of fixed sequences against the trainer's
(the sharded policy's own forward): after the first push, after two optimizer steps but before the engine was told
(the stale weights: a wrong push), and after the next generation pushed the gathered (merged-LoRA) weights. The
trainer's log-probs are also taken before and after a gather, to show the gather merged nothing into the live model.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

WORLD = 2
SEQS = [[1, 17, 250, 31, 99, 400, 12, 7, 300], [2, 45, 46, 47, 48, 200, 201, 5]]


def trainer_logprobs(policy, seq):
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([seq])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)


def engine_logprobs(backend, seq):
    from vllm import SamplingParams as VSamplingParams

    out = backend.engine.llm.generate([{"prompt_token_ids": seq}], VSamplingParams(max_tokens=1, prompt_logprobs=0),
                                      use_tqdm=False)[0]
    return torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], seq[1:])])


def gap(backend, policy) -> float:
    return max((engine_logprobs(backend, s) - trainer_logprobs(policy, s)).abs().max().item() for s in SEQS)


def one_policy(rank: int, lora: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from tirl.config.schema import RolloutConfig
    from tirl.models.load import LoraSpec, load_policy
    from tirl.models.sharding import is_sharded, shard_policy
    from tirl.models.tiny import load_tiny_tokenizer
    from tirl.rollout import vllm as V
    from tirl.rollout.types import SamplingParams

    torch.manual_seed(0)   # the same starting weights on both ranks, as from one checkpoint
    policy = load_policy("tiny", dtype="float32", lora=LoraSpec(r=8, alpha=16) if lora else None)
    if lora:
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)   # B starts at zero; make the adapter matter from the start
    shard_policy(policy, init_device_mesh("cpu", (WORLD,)))
    cfg = RolloutConfig(backend="vllm", max_prompt_tokens=64, max_total_tokens=64)
    backend = V.VLLMBackend.colocated(policy, load_tiny_tokenizer(), cfg, dtype="float32")
    greedy = SamplingParams(max_new_tokens=2, temperature=0.0, stop_at_code=False)
    row = {"sharded": is_sharded(policy)}
    row["local_numel"] = sum(p.to_local().numel() for p in policy.parameters())
    row["full_numel"] = sum(p.numel() for p in policy.parameters())
    backend.generate([SEQS[0][:3]], greedy)                            # first push: the gathered start weights
    row["gap_after_first_push"] = gap(backend, policy)

    before_gather = [trainer_logprobs(policy, s) for s in SEQS]
    weights = V.policy_weights(policy)                               # gathered (and merged) copies
    row["pushed_keys_are_hf_names"] = all("lora_" not in k and "base_layer" not in k for k in weights)
    row["gather_left_trainer_unchanged"] = max(
        (trainer_logprobs(policy, s) - b).abs().max().item() for s, b in zip(SEQS, before_gather))
    del weights

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.tensor([SEQS[rank]])                                  # each rank its own data: gradients reduced
    for _ in range(2):
        opt.zero_grad()
        logits = policy(input_ids=ids).logits[0, :-1]
        F.cross_entropy(logits, ids[0, 1:]).backward()
        opt.step()
    row["gap_stale_engine"] = gap(backend, policy)                    # what a missed (or wrong) push would serve
    backend.generate([SEQS[1][:3]], greedy)                           # sees the version move: gathers and pushes
    row["gap_after_update_push"] = gap(backend, policy)
    row["trainer_moved"] = max((trainer_logprobs(policy, s) - b).abs().max().item() for s, b in zip(SEQS, before_gather))
    backend.close()
    return row


def main(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a hang (a rank left alone in a collective) ends this rank with every thread's stack, well before the test's
    # own timeout kills the process group
    faulthandler.dump_traceback_later(float(os.environ.get("TIRL_RANK_TIMEOUT", "150")), exit=True)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {"full": one_policy(rank, lora=False), "lora": one_policy(rank, lora=True)}
    dist.barrier()   # the trainer's group outlived both engines' closing
    result["group_alive"] = dist.is_initialized()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(main, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD)
