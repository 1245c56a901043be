"""Rollout speed: tirl's HF sampling loop vs the vLLM engine as tirl runs it (in-process, weights pushed), same work.

    .venv-vllm/bin/python scripts/bench_rollout.py                        # tiny and bench-40m, 64 prompts x 128 tokens
    .venv-vllm/bin/python scripts/bench_rollout.py --models tiny --prompts 32 --tokens 64 --threads 2

Runs in the vLLM venv (README: vLLM without a GPU); on a GPU machine with vllm it measures the GPU engine. Both
backends get the same prompts (distinct, rendered with the chat template), the same budget, temperature 1, no stop
at code fences, fp32, and ``--threads`` torch threads; tokens/s counts the tokens each backend actually produced
(a sample may end early at EOS; random-init models rarely emit it). Each
backend does one untimed warm-up call, then ``--repeats`` timed calls; the vLLM time includes the weight push that
tirl does after every optimizer step (the parameter version is bumped before each call). Models: ``BENCH_MODELS``
(tirl.models.tiny), built by the one builder the other benchmarks use. Prints one JSON line per (model, backend).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")


def bench(name: str, args) -> None:
    """Time both backends on one benchmark model; print a JSON line for each."""
    import torch

    from tirl.config.schema import RolloutConfig
    from tirl.models.tiny import build_bench_model
    from tirl.rollout import vllm as V
    from tirl.rollout.backend import HFBackend
    from tirl.rollout.types import SamplingParams

    params = SamplingParams(max_new_tokens=args.tokens, temperature=1.0, stop_at_code=False)
    policy, tok = build_bench_model(name)
    device = V.engine_device()
    policy = policy.to(device)
    prompts = [tok.encode(f"<|im_start|>user\nitem {i}: {'abc ' * (i % 7)}<|im_end|>\n<|im_start|>assistant\n")
               for i in range(args.prompts)]
    n_params = sum(p.numel() for p in policy.parameters())
    cfg = RolloutConfig(backend="vllm", max_prompt_tokens=64, max_total_tokens=args.tokens, enable_sleep_mode=False,
                        gpu_memory_utilization=0.3)
    t0 = time.perf_counter()
    vb = V.VLLMBackend.colocated(policy, tok, cfg, dtype="float32")
    start_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)

    def vllm_call():
        with torch.no_grad():
            policy.model.norm.weight.add_(0.0)             # bumps the version: a push, as after an optimizer step
        return vb.generate(prompts, params)

    backends = {"hf": lambda: HFBackend(policy, tok).generate(prompts, params), "vllm": vllm_call}
    for label, call in backends.items():
        torch.manual_seed(0)
        call()                                              # warm-up
        times, tokens = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gens = call()
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(g.ids) for g in gens))
        best = min(range(args.repeats), key=lambda i: times[i])
        print(json.dumps({
            "model": name, "params_M": round(n_params / 1e6, 1), "backend": label, "device": device,
            "threads": args.threads, "prompts": args.prompts, "max_new_tokens": args.tokens,
            "tokens": tokens[best], "seconds": round(times[best], 3), "tokens_per_s": round(tokens[best] / times[best], 1),
            **({"engine_start_s": round(start_s, 1)} if label == "vllm" else {}),
        }), flush=True)
    vb.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "bench-40m"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
