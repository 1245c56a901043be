"""RL step speed on a fixed tiny workload: tirl's GRPOModule, and TRL's GRPOTrainer at equal settings when installed.

    python scripts/bench_rl.py                          # both, each in its own process (clean peak RSS)
    python scripts/bench_rl.py --lora --beta 0.04 --steps 5

Equal settings: the same tiny Qwen3 weights (seed 0), the same rendered prompts, G samples per prompt, the same
max completion length and temperature 1, one optimiser step per rollout batch with the whole batch in one
micro-batch, the same β (β = 0: no reference model in either), LoRA or not, no vLLM, no gradient checkpointing,
and the same reward callable. The first step is a warm-up and is not timed.

Per-step phases, measured the same way on both sides: ``rollout`` = sampling the completions (tirl:
``rollout_groups``; TRL: ``_generate``, which also decodes them), ``scoring`` = the reward call (tirl: ``score``,
which decodes; TRL: ``_calculate_rewards``), ``update+other`` = the rest of the step (reference pass, training
forward/backward, optimiser, bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def prompts(n: int) -> list[dict]:
    return [{"id": f"p{i}", "task": "math", "messages": [{"role": "user", "content": f"What is {i} + {i + 3}?"}],
             "answer": str(2 * i + 3)} for i in range(n)]


def length_reward(texts: list[str], **_) -> list[float]:
    """Cheap and varied: closeness of the response to 40 characters (the bench times the RL step, not a task)."""
    return [-abs(len(t) - 40) / 40 for t in texts]


class Timer:
    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t0
        return timed


def run_tirl(args) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from tirl.config.schema import (
        LoraConfig,
        LossConfig,
        MethodConfig,
        ModelConfig,
        RolloutConfig,
        SandboxConfig,
    )
    from tirl.models.tiny import load_tiny_tokenizer
    from tirl.modules.grpo import GRPOModule

    torch.set_num_threads(args.threads)
    tok = load_tiny_tokenizer()
    method = MethodConfig(group_size=args.G, rollout_batch_size=args.N, micro_batch_size=args.N * args.G, lr=1e-5,
                          loss=LossConfig(kl_coef=args.beta, agg="token-mean"), log_samples=0)
    model = ModelConfig(name_or_path="tiny", seed=0, lora=LoraConfig(enabled=args.lora, r=8, alpha=16))
    rollout = RolloutConfig(backend=args.rollout, max_new_tokens=args.max_new, max_total_tokens=args.max_new,
                            max_tool_rounds=0, max_prompt_tokens=128)
    module = GRPOModule(method, model, rollout, SandboxConfig(workers=1), tok)
    module.reward_fn = module.accuracy_fn = length_reward
    gen_t, upd_t, sample_t, score_t = Timer(), Timer(), Timer(), Timer()
    counts = {"rollout_tokens": 0, "train_tokens": 0}
    make_experience = module.make_experience
    module.rollout_groups = sample_t.wrap(module.rollout_groups)
    module.score = score_t.wrap(module.score)

    def counted_collect(records):
        out = make_experience(records)
        trajs = out[0]
        counts["rollout_tokens"] += sum(len(t.response_ids) for t in trajs)
        counts["train_tokens"] += sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
        return out

    module.make_experience = gen_t.wrap(counted_collect)
    module.update = upd_t.wrap(module.update)
    step_times: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            step_times.append(time.perf_counter() - self.t0)
            if len(step_times) == 1:        # warm-up step: reset the phase clocks
                gen_t.total = upd_t.total = sample_t.total = score_t.total = 0.0
                counts.update(rollout_tokens=0, train_tokens=0)

    data = DataLoader(prompts(args.N) * (args.steps + 1), batch_size=args.N, collate_fn=list)
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[StepClock()])
    trainer.fit(module, train_dataloaders=data)
    return summarize("tirl", step_times[1:], gen_t.total, upd_t.total, counts, sample_t.total, score_t.total)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tirl.data.prompts import PromptEncoder
    from tirl.models.tiny import build_tiny, load_tiny_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tiny_tokenizer()
    tok.padding_side = "left"
    model = build_tiny(0)[0]
    encoder = PromptEncoder(tok)   # tirl's prompts, so both trainers read the same text
    texts = [encoder.text(r) for r in prompts(args.N)]
    data = Dataset.from_dict({"prompt": texts * (args.steps + 1)})
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg = GRPOConfig(
        output_dir=os.path.join(args.out, "trl"), per_device_train_batch_size=args.N * args.G, num_generations=args.G,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_completion_length=args.max_new,
        beta=args.beta, learning_rate=1e-5, temperature=1.0, loss_type="dapo", use_cpu=True, bf16=False,
        gradient_checkpointing=False, max_steps=args.steps + 1, logging_steps=1000, save_strategy="no",
        report_to="none", use_vllm=False, disable_tqdm=True, seed=0, shuffle_dataset=False,
    )

    def reward(completions, **_):
        return length_reward(completions)

    step_times: list[float] = []
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          peft_config=peft_config)
    gen_t = Timer()
    counts = {"rollout_tokens": 0, "train_tokens": 0}
    gen = trainer._generate_and_score_completions

    def counted_gen(inputs):
        out = gen(inputs)
        n_comp = int(out["completion_mask"].sum())
        counts["rollout_tokens"] += n_comp
        counts["train_tokens"] += n_comp + int(out["prompt_mask"].sum())
        return out

    trainer._generate_and_score_completions = gen_t.wrap(counted_gen)
    sample_t, score_t = Timer(), Timer()
    trainer._generate = sample_t.wrap(trainer._generate)
    trainer._calculate_rewards = score_t.wrap(trainer._calculate_rewards)

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)
            if len(step_times) == 1:
                gen_t.total = sample_t.total = score_t.total = 0.0
                counts.update(rollout_tokens=0, train_tokens=0)

    trainer.add_callback(StepClock())
    trainer.train()
    total = sum(step_times[1:])
    return summarize("trl", step_times[1:], gen_t.total, total - gen_t.total, counts, sample_t.total, score_t.total)


def summarize(name: str, steps: list[float], gen_s: float, upd_s: float, counts: dict, sample_s: float,
              score_s: float) -> dict:
    total = sum(steps)
    n = len(steps)
    return {
        "phase_s_per_step": {"rollout": sample_s / n, "scoring": score_s / n,
                             "update+other": (total - sample_s - score_s) / n},
        "impl": name, "steps": len(steps), "s_per_step": total / len(steps), "steps_per_s": len(steps) / total,
        "rollout_tokens_per_s": counts["rollout_tokens"] / max(gen_s, 1e-9),
        "train_tokens_per_s": counts["train_tokens"] / max(upd_s, 1e-9),
        "rollout_s": gen_s, "update_s": upd_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=4, help="prompts per step")
    ap.add_argument("--G", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=64, help="max completion tokens")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rollout", choices=["hf", "vllm"], default="hf",
                    help="tirl's rollout backend (vllm: run in the vLLM venv; the engine starts in the untimed warm-up step)")
    ap.add_argument("--only", choices=["tirl", "trl"], help="run one implementation in this process (internal)")
    ap.add_argument("--out", default="/tmp/tirl_bench_rl")
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_tirl(args) if args.only == "tirl" else run_trl(args)))
        return 0
    try:
        import trl  # noqa: F401
        impls = ["tirl", "trl"]
    except ImportError:
        impls = ["tirl"]
        print("trl is not installed: timing tirl only (`pip install trl` to compare).", file=sys.stderr)
    results = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--only", impl, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    settings = {k: getattr(args, k) for k in ("N", "G", "max_new", "beta", "lora", "steps", "threads", "rollout")}
    print(f"workload: {settings}")
    print(f"{'impl':6} {'s/step':>8} {'steps/s':>8} {'rollout tok/s':>14} {'train tok/s':>12} {'peak RSS MB':>12}")
    for r in results.values():
        print(f"{r['impl']:6} {r['s_per_step']:8.3f} {r['steps_per_s']:8.3f} {r['rollout_tokens_per_s']:14.0f} "
              f"{r['train_tokens_per_s']:12.0f} {r['peak_rss_mb']:12.0f}")
    print(f"per step (s): {'impl':6} {'rollout':>8} {'scoring':>8} {'update+other':>13}")
    for r in results.values():
        ph = r["phase_s_per_step"]
        print(f"              {r['impl']:6} {ph['rollout']:8.3f} {ph['scoring']:8.3f} {ph['update+other']:13.3f}")
    if "trl" in results:
        print(f"tirl / TRL steps/s: {results['tirl']['steps_per_s'] / results['trl']['steps_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
