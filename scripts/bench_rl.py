"""RL step speed on a fixed tiny workload: tirl's GRPOModule, and TRL's GRPOTrainer at equal settings when installed.

    python scripts/bench_rl.py                          # both, each in its own process (clean peak RSS)
    python scripts/bench_rl.py --lora --beta 0.04 --steps 5
    python scripts/bench_rl.py --forced-lengths --max-new 2000 --steps 1   # realistic lengths, equal on both sides

Equal settings: the same tiny Qwen3 weights (seed 0), the same rendered prompts, G samples per prompt, the same
max completion length and temperature 1, one optimiser step per rollout batch with the whole batch in one
micro-batch, the same β (β = 0: no reference model in either), LoRA or not, no vLLM, no gradient checkpointing,
and the same reward callable. The first step is a warm-up and is not timed.

Per-step phases, measured the same way on both sides: ``rollout`` = sampling the completions (tirl:
``rollout_groups``; TRL: ``_generate``, which also decodes them), ``scoring`` = the reward call (tirl: ``score``,
which decodes; TRL: ``_calculate_rewards``), ``update+other`` = the rest of the step (reference pass, training
forward/backward, optimiser, bookkeeping).

``--forced-lengths``: every sample gets a fixed length on both sides, drawn once from the update benchmark's
log-normal (``bench_update.response_lengths``: median --median, sigma --sigma, capped at --max-new) — a forward hook
on the lm_head (``ForcedLengths``) bans the stop tokens before a row's length and forces the end-of-turn token at
it, in tirl's sampler and in TRL's ``generate`` alike, so both sides sample, score and train on the same lengths.
``--model bench-40m``: the ~38 M benchmark model (``tirl.models.tiny.build_bench_model``), saved once and loaded
by both trainers from that folder.
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


class ForcedLengths:
    """Forces sample b of a rollout to end after exactly ``lengths[b]`` tokens (the last one the end-of-turn token):
    a forward hook on the model's lm_head that, while ``during`` runs, sets the stop tokens' logits to -inf before a
    row's length and every other logit to -inf at it. Both samplers keep a batch's rows in place and call the head
    once per new token, so call k writes token k of every row; a prefill over distinct prompts only (tirl reads a
    group's prompt once) has fewer rows and only bans. Lengths must be >= 2 and the batch one sampler call."""

    def __init__(self, model, lengths: list[int], stop_ids: list[int], eos_id: int):
        import torch

        assert min(lengths) >= 2, "forced lengths must be at least 2 tokens"
        self.lengths = torch.tensor(lengths)
        self.stop, self.eos, self.step = sorted(set(stop_ids)), eos_id, None
        model.get_output_embeddings().register_forward_hook(self.hook)

    def during(self, fn):
        def forced(*a, **k):
            self.step = 0
            try:
                return fn(*a, **k)
            finally:
                self.step = None
        return forced

    def hook(self, module, inputs, out):
        if self.step is None:
            return None
        last = out[:, -1]                                                        # [B, V] a view: edited in place
        k, self.step = self.step, self.step + 1
        last[:, self.stop] = float("-inf")
        if last.shape[0] == len(self.lengths):
            end = self.lengths == k + 1                                          # rows whose token k is the last
            if bool(end.any()):
                last[end] = float("-inf")
                last[end, self.eos] = 0.0
        return out


def forced_lengths(args) -> list[int] | None:
    if not args.forced_lengths:
        return None
    from bench_update import response_lengths  # scripts/ is this script's import path

    return response_lengths(args.N * args.G, args.median, args.sigma, args.max_new, min_len=2, seed=0)


def model_path(args) -> str:
    """'tiny' (built from the name by both trainers), or the benchmark model saved once under --out."""
    if args.model == "tiny":
        return "tiny"
    from tirl.models.tiny import build_bench_model

    path = os.path.join(args.out, args.model)
    if not os.path.exists(os.path.join(path, "config.json")):
        model, tok = build_bench_model(args.model)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


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
                          **({"packing": False} if args.padded else {}),
                          loss=LossConfig(kl_coef=args.beta, agg="token-mean"), log_samples=0)
    model = ModelConfig(name_or_path=model_path(args), seed=0, lora=LoraConfig(enabled=args.lora, r=8, alpha=16))
    rollout = RolloutConfig(backend=args.rollout, max_new_tokens=args.max_new, max_total_tokens=args.max_new,
                            max_tool_rounds=0, max_prompt_tokens=128)
    module = GRPOModule(method, model, rollout, SandboxConfig(workers=1), tok)
    module.reward_fn = module.accuracy_fn = length_reward
    gen_t, upd_t, sample_t, score_t = Timer(), Timer(), Timer(), Timer()
    counts = {"rollout_tokens": 0, "train_tokens": 0}
    make_experience = module.make_experience
    rollout_groups = original_rollout = module.rollout_groups
    lengths = forced_lengths(args)
    if lengths is not None:     # the policy exists once Lightning has set the module up: hook it at the first rollout
        def forced_rollout(*a, **k):
            if not hasattr(module, "_forced"):
                module._forced = ForcedLengths(module.policy, lengths, [tok.eos_token_id, tok.pad_token_id],
                                               tok.eos_token_id)
            return module._forced.during(original_rollout)(*a, **k)
        rollout_groups = forced_rollout
    module.rollout_groups = sample_t.wrap(rollout_groups)
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
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tirl.data.prompts import PromptEncoder
    from tirl.models.tiny import build_tiny, load_tiny_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tiny_tokenizer()
    tok.padding_side = "left"
    path = model_path(args)
    model = build_tiny(0)[0] if path == "tiny" else AutoModelForCausalLM.from_pretrained(path)
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
    generate = trainer._generate
    lengths = forced_lengths(args)
    if lengths is not None:
        forced = ForcedLengths(trainer.model, lengths, [tok.eos_token_id, tok.pad_token_id], tok.eos_token_id)
        generate = forced.during(generate)
    trainer._generate = sample_t.wrap(generate)
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
        "rollout_s": gen_s, "update_s": upd_s, "rollout_tokens_per_step": counts["rollout_tokens"] / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=4, help="prompts per step")
    ap.add_argument("--G", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=64, help="max completion tokens")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--model", default="tiny", help="tiny, or a tirl.models.tiny.BENCH_MODELS name (bench-40m)")
    ap.add_argument("--padded", action="store_true", help="tirl's padded update (method.packing=false)")
    ap.add_argument("--forced-lengths", action="store_true",
                    help="force every sample's length on both sides, log-normal (--median, --sigma, cap --max-new)")
    ap.add_argument("--median", type=float, default=250, help="median forced length (tokens)")
    ap.add_argument("--sigma", type=float, default=0.9, help="log-sd of the forced lengths")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rollout", choices=["hf", "vllm"], default="hf",
                    help="tirl's rollout backend (vllm: run in the vLLM venv; the engine starts in the untimed warm-up step)")
    ap.add_argument("--only", choices=["tirl", "trl"], help="run one implementation in this process (internal)")
    ap.add_argument("--out", default="/tmp/tirl_bench_rl")
    args = ap.parse_args()
    if args.forced_lengths and args.N * args.G > 64:
        print("--forced-lengths needs N x G <= 64 (one sampler call).", file=sys.stderr)
        return 2
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
    settings = {k: getattr(args, k) for k in ("model", "N", "G", "max_new", "beta", "lora", "steps", "threads",
                                              "rollout", "forced_lengths", "padded")}
    lengths = forced_lengths(args)
    if lengths is not None:
        settings["forced"] = f"median {args.median:g}, sigma {args.sigma:g}: {sum(lengths)} tokens a step, max {max(lengths)}"

    print(f"workload: {settings}")
    print(f"{'impl':6} {'s/step':>8} {'steps/s':>8} {'rollout tok/s':>14} {'train tok/s':>12} {'peak RSS MB':>12} {'resp tok/step':>13}")
    for r in results.values():
        print(f"{r['impl']:6} {r['s_per_step']:8.3f} {r['steps_per_s']:8.3f} {r['rollout_tokens_per_s']:14.0f} "
              f"{r['train_tokens_per_s']:12.0f} {r['peak_rss_mb']:12.0f} {r['rollout_tokens_per_step']:13.0f}")
    print(f"per step (s): {'impl':6} {'rollout':>8} {'scoring':>8} {'update+other':>13}")
    for r in results.values():
        ph = r["phase_s_per_step"]
        print(f"              {r['impl']:6} {ph['rollout']:8.3f} {ph['scoring']:8.3f} {ph['update+other']:13.3f}")
    if "trl" in results:
        print(f"tirl / TRL steps/s: {results['tirl']['steps_per_s'] / results['trl']['steps_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
