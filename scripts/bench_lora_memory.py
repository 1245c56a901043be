"""LoRA's reference costs no second model: peak memory of an RL update with LoRA + KL (β > 0) vs LoRA with no
reference (β = 0), and, for contrast, a full fine-tune whose β > 0 needs a frozen copy.

Each case runs in a fresh process: build a Qwen3 policy (random init, ~100 M parameters by default so weights
dominate), then one RL update through GRPOModule's loss (policy forward, reference forward when β > 0, backward)
on a fixed batch. Peak memory is the process's max RSS on CPU, or torch.cuda.max_memory_allocated on a GPU.
Exits non-zero if LoRA + β > 0 peaks above 1.1× LoRA with no reference.

    python scripts/bench_lora_memory.py [--hidden 768] [--layers 12] [--batch 2] [--seq 64]  (small batch: weights, not activations, dominate)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def case(args) -> dict:
    import torch

    from tirl.config.schema import (
        LoraConfig,
        LossConfig,
        MethodConfig,
        ModelConfig,
        RolloutConfig,
        SandboxConfig,
    )
    from tirl.models.tiny import build_tiny
    from tirl.modules.grpo import GRPOModule
    from tirl.rl.batch import Sample, collate_samples

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    model, tok = build_tiny(0, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                            head_dim=64, vocab_size=512)
    lora = LoraConfig(enabled=args.lora, r=16, alpha=32)
    method = MethodConfig(loss=LossConfig(kl_coef=args.beta), micro_batch_size=args.batch)
    module = GRPOModule(method, ModelConfig(name_or_path="tiny", lora=lora), RolloutConfig(), SandboxConfig(), tok)
    module.policy = model
    if args.lora:
        from tirl.models.load import LoraSpec, apply_lora

        module.policy = apply_lora(model, LoraSpec(r=16, alpha=32))
    from tirl.models.reference import make_frozen_reference

    module.frozen_ref = make_frozen_reference(module.policy, args.beta)
    if cuda:
        module.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    samples = [Sample([1] * 16, torch.randint(10, 500, (args.seq,), generator=g).tolist(), [1] * args.seq,
                      [-6.0] * args.seq, [6.0] * args.seq, 1.0 if i % 2 else -1.0) for i in range(args.batch)]
    tb = collate_samples(samples, tok.pad_token_id).to(module.device)
    counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}
    params = sum(p.numel() for p in module.policy.parameters())
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loss, _ = module.micro_batch_loss(tb, counts)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"params_M": params / 1e6, "peak_MB": peak, "rss_before_step_MB": base_rss, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--case", choices=["lora_nokl", "lora_kl", "full_kl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        args.lora = args.case.startswith("lora")
        args.beta = 0.04 if args.case.endswith("_kl") else 0.0
        print(json.dumps(case(args)))
        return
    rows = {}
    for name in ("lora_nokl", "lora_kl", "full_kl"):
        cmd = [sys.executable, __file__, "--case", name, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
    base = rows["lora_nokl"]["peak_MB"]
    print(f"one RL update, {rows['lora_nokl']['params_M']:.0f} M-parameter Qwen3, batch {args.batch} x {args.seq} tokens, "
          f"peak memory on {rows['lora_nokl']['device']}")
    labels = {"lora_nokl": "LoRA, beta=0 (no reference)", "lora_kl": "LoRA, beta=0.04 (adapter off)",
              "full_kl": "full FT, beta=0.04 (frozen copy)"}
    for name, r in rows.items():
        print(f"  {labels[name]:34s} {r['peak_MB']:9.0f} MB   {r['peak_MB'] / base:5.2f}x")
    ratio = rows["lora_kl"]["peak_MB"] / base
    print(f"LoRA + KL vs no reference: {ratio:.3f}x (target <= 1.1x) -> {'ok' if ratio <= 1.1 else 'FAIL'}")
    sys.exit(0 if ratio <= 1.1 else 1)


if __name__ == "__main__":
    main()
