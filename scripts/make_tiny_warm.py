"""Build the warm tiny checkpoint that tirl ships in ``src/tirl/assets/tiny_warm`` (the embedded default's start).

SFTs the tiny Qwen3 from scratch on synthetic tool-integrated data — math solutions whose ```output blocks come from
really running their code in the sandbox, and function-calling answers with D-CORE-style decomposition — through the
same SFTModule / SFTDataModule / Lightning Trainer that ``method=sft`` uses, then exports an HF directory
(``save_pretrained``; loadable with ``from_pretrained``) and prints held-out greedy accuracy on both tasks.

It is deliberately stopped early, in the middle of both tasks' learning: a 2,000-step cosine schedule cut at step
400, on 1,500 math and 10,000 tool-call samples (tool calls drawn in the RL stream's category mix). Both tasks
are learnt in a sharp transition, and where it stands at the cut is what RL has to work with:

| SFT step | math greedy / Avg@4 at T=1 | tool calls greedy / Avg@4 at T=1 |
|---|---|---|
| 400 (shipped) | 0.48 / 0.19 | 0.67 / 0.47 |
| 475 | 0.53 / 0.35 | 0.81 / 0.64 |
| 500 | 0.62 / 0.47 | 0.77 / 0.69 |
| 600 | 0.80 / 0.72 | 0.81 / 0.70 |

(held-out problems: 128 at step 400, 64 at the others.) From step 400, 60 THOR steps take math from 0.19 to 0.68
(seed 0, held-out Avg@8 at T=1); from step 450, from 0.47 to 0.75. D-CORE, at that budget, gains 5 to 6 points on
function calls from either; at its own preset's (180 steps of 16 prompts) +21 from step 400 (mean of 3 seeds).

Earlier cuts leave skills RL cannot build in a CPU budget (copying argument values, telling an offered function from
a missing one); later ones leave little to learn. About 4 minutes on 2 CPU cores.

    python scripts/make_tiny_warm.py [--steps 2000] [--stop-at 400] [--math 1500] [--toolcall 10000] [--split train]
                                     [--out src/tirl/assets/tiny_warm] [--snapshots 400 500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from tirl.config.schema import MethodConfig, ModelConfig
from tirl.data.datamodules import SFTDataModule
from tirl.data.sources import write_records
from tirl.data.synthetic_math import make_math_sft_samples
from tirl.data.synthetic_toolcall import make_toolcall_sft_samples
from tirl.models.tiny import load_tiny_tokenizer
from tirl.modules.sft import SFTModule
from tirl.tools.sandbox import LocalSandbox

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--math", type=int, default=1500, help="math SFT samples")
    p.add_argument("--toolcall", type=int, default=10000, help="function-calling SFT samples")
    p.add_argument("--split", default="train", choices=["train", "sft"],
                   help="where the SFT samples come from: the whole train split, or its sft half (then RL with "
                        "data.synthetic.split=rl trains on prompts the checkpoint has never seen)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "src/tirl/assets/tiny_warm")
    p.add_argument("--eval", type=int, default=64, help="held-out problems per task for the accuracy printout")
    p.add_argument("--eval-only", action="store_true", help="only print the accuracy of the checkpoint in --out")
    p.add_argument("--stop-at", type=int, default=400,
                   help="stop after this many steps of the --steps schedule (the LR is still near its peak)")
    p.add_argument("--snapshots", type=int, nargs="*", default=[],
                   help="also export the model at these steps, to <out>_step<N> (to pick a warm start with room for RL)")
    args = p.parse_args()
    if args.eval_only:
        return report(args)
    torch.set_num_threads(2)
    pl.seed_everything(args.seed)
    t0 = time.time()

    tok = load_tiny_tokenizer()
    with LocalSandbox(workers=2) as sandbox, tempfile.TemporaryDirectory() as tmp:
        samples = make_math_sft_samples(args.math, seed=args.seed + 1, sandbox=sandbox, split=args.split)
        samples += make_toolcall_sft_samples(args.toolcall, seed=args.seed + 1, max_tools=2, split=args.split)
        data = Path(tmp) / "sft.jsonl"
        write_records(data, samples)
        print(f"{len(samples)} SFT samples ({args.math} math, {args.toolcall} tool-call) in {time.time() - t0:.0f}s")

        method = MethodConfig(name="sft", kind="sft", lr=args.lr, warmup_steps=20, lr_schedule="cosine",
                              weight_decay=0.0, module={"_target_": "tirl.modules.sft.SFTModule"})
        module = SFTModule(method, ModelConfig(name_or_path="tiny", seed=args.seed), tok)
        dm = SFTDataModule(tok, train=str(data), batch_size=args.batch_size, max_length=768, seed=args.seed,
                           val_size=64)
        snapshots = [Snapshot(args.out, args.snapshots, tok)] if args.snapshots else []
        snapshots.append(StopAt(args.stop_at))
        trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             callbacks=snapshots,
                             gradient_clip_val=1.0, val_check_interval=200, check_val_every_n_epoch=None,
                             num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
    print(f"trained {trainer.global_step} of {args.steps} scheduled steps in {time.time() - t0:.0f}s; val/loss {float(trainer.callback_metrics['val/loss']):.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    module.policy.generation_config.pad_token_id = tok.pad_token_id
    module.export_hf(str(args.out))   # weights + tokenizer: a checkpoint that loads on its own
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "eval_only")}
    (args.out / "tirl_warm.json").write_text(json.dumps(recipe, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"wrote {args.out} ({size:.1f} MB)")

    report(args)


class StopAt(pl.Callback):
    """End the run at ``step`` while the schedule (cosine over ``--steps``) is laid out for the full length."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class Snapshot(pl.Callback):
    """Export an HF directory at chosen steps of the same run (mid-schedule: the LR has not decayed to 0 yet)."""

    def __init__(self, out: Path, steps: list[int], tok):
        self.out, self.steps, self.tok = out, set(steps), tok

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            module.policy.generation_config.pad_token_id = self.tok.pad_token_id
            module.export_hf(str(self.out.parent / f"{self.out.name}_step{trainer.global_step}"))


def report(args) -> None:
    from tirl.benchmarks.heldout import heldout_accuracy

    for task in ("math", "toolcall"):
        greedy = heldout_accuracy(str(args.out), task, n=args.eval)
        sampled = heldout_accuracy(str(args.out), task, n=args.eval, temperature=1.0, samples=4)
        print(f"held-out accuracy, {task}: greedy {greedy:.3f}, Avg@4 at T=1 {sampled:.3f}")


if __name__ == "__main__":
    main()
