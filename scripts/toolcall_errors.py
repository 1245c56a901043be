"""Where a checkpoint's tool-call answers go wrong, per category: the breakdown behind the README's account of why
tool-call RL stalls on the tiny model.

    python scripts/toolcall_errors.py [--model tiny-warm] [--ckpt run/checkpoints/last.ckpt] [--n 128] [--samples 8]

Samples ``--samples`` answers at ``--temperature`` for each of ``--n`` held-out synthetic prompts (the prompts
``val/acc`` is not measured on: `tirl.benchmarks.heldout`'s seed), classifies each with `tirl.benchmarks.toolcall_errors`, and
prints the fraction of each error kind per category, irrelevance split into small talk and a missing function,
rows split by how many functions the prompt offers. ``--ckpt`` loads a Lightning checkpoint of an RL run over
``--model`` (through ``init_from``, as training and evaluation read it: the policy weights, LoRA merged; the
reference copy in it is ignored).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter, defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-warm", help="model name, HF id or local path")
    p.add_argument("--ckpt", default=None, help="Lightning checkpoint whose policy weights to evaluate")
    p.add_argument("--n", type=int, default=128, help="held-out prompts")
    p.add_argument("--samples", type=int, default=8, help="answers per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from tirl.benchmarks.heldout import heldout_records, preset_rollout
    from tirl.benchmarks.toolcall_errors import KINDS, prompt_group, toolcall_error
    from tirl.config.schema import MethodConfig, ModelConfig, RewardConfig, SandboxConfig
    from tirl.models.load import ModelNotFoundError, load_tokenizer
    from tirl.modules.grpo import GRPOModule

    torch.manual_seed(args.seed)
    rollout = preset_rollout("toolcall", temperature=args.temperature)
    module = GRPOModule(MethodConfig(reward=RewardConfig(name="toolcall_exact")), ModelConfig(name_or_path=args.model),
                        rollout, SandboxConfig(workers=1), load_tokenizer(args.model), init_from=args.ckpt)
    try:
        module.setup("validate")   # init_from: the checkpoint's policy weights (LoRA merged), as training reads them
    except ModelNotFoundError as err:
        raise SystemExit(str(err)) from None
    records = heldout_records("toolcall", args.n)
    trajs = module.rollout_groups(records, args.samples)
    counts: dict[str, Counter] = defaultdict(Counter)
    for t in trajs:
        record = records[t.meta["group"]]
        kind = toolcall_error(module.response_text(t), record["answer"], record["messages"][-1]["content"],
                              record.get("tools"), record.get("category"))
        counts[prompt_group(record)][kind] += 1
        counts["all"][kind] += 1
    module.teardown("validate")

    shown = [k for k in KINDS if counts["all"][k]]
    width = max(len(g) for g in counts) + 2
    print(f"{args.model}{' + ' + args.ckpt if args.ckpt else ''}: {args.n} held-out prompts x {args.samples} at "
          f"T={args.temperature}; fraction of answers per error kind")
    print(f"{'':{width}s}{'answers':>8s} " + " ".join(f"{k:>{max(len(k), 5)}s}" for k in shown))
    for group in sorted(counts, key=lambda g: (g == "all", g)):
        total = sum(counts[group].values())
        print(f"{group:{width}s}{total:8d} " + " ".join(f"{counts[group][k] / total:{max(len(k), 5)}.2f}" for k in shown))


if __name__ == "__main__":
    main()
