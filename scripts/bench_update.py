"""RL update speed and memory at realistic response lengths: tirl padded vs packed, and TRL's GRPO loss, one run.

    python scripts/bench_update.py                 # the workload below (~15-25 min on 2 loaded cores)
    python scripts/bench_update.py --N 8           # the issue's 8 x 8 (twice the time; micro-batches as below)
    python scripts/bench_update.py --quick         # smoke run: tiny sizes, ~30 s
    python scripts/bench_update.py --only packed --profile --N 1    # where a row's time goes (torch.profiler)

Workload (seeded, the same in every configuration): ``build_bench_model("bench-40m", vocab_size=--vocab)`` (Qwen3,
12 layers, hidden 512, random init, fp32, SDPA), N = 4 prompts x G = 8 samples; prompt lengths uniform in [150, 300]
tokens; response lengths log-normal, median 250, sigma 0.9, clipped to [16, 2000] (``response_lengths``; the default
draw holds a 2,000-token response; N = 8 adds the other 32 of the same 64-sample draw); token ids uniform
over the vocabulary; one PPO mini-batch = the whole round (one optimizer step, AdamW); full fine-tune with the KL
term on (beta = 0.001, k3), so the update = policy forward + backward + a frozen reference copy's forward +
optimizer step; old log-probs from the rollout (no recompute pass); temperature 1; token-mean loss.

Configurations (each in its own child process, one torch thread, peak RSS from ``getrusage`` in that child; the
"update" column is that peak minus the child's RSS just before the update, i.e. what the update itself added on
top of model, reference copy and batch; it includes AdamW's state, equal in every row. RSS rather than tracemalloc,
which does not see torch's C++ allocations; a child per row because ``ru_maxrss`` never goes down):
  (a) equal micro-batch SEQUENCE count (--micro-seqs, default 2: with 8 a group holding the 2,000-token answer
      needs ~12 GB in TRL, more than this shared machine has to spare): tirl padded, tirl packed, and TRL's
      ``GRPOTrainer._compute_loss`` + backward on the same rows (its inputs dict: prompt/completion ids and masks,
      advantages, old and reference per-token log-probs, the reference pass timed as TRL runs it);
  (b) equal TOKEN budget (--micro-tokens, default 2,048 real tokens): tirl padded and packed with
      ``method.micro_batch_tokens`` (the same balanced micro-batches; a padded one pads to its longest row).
Tokens/s counts the batch's real tokens (every sample's prompt + response, no padding) over the update's wall
time, the same numerator for every row, so ratios of tokens/s are ratios of speed. Model FLOPs (same for every row):
    F = 8 * (N_body * T_all + d * V * T_resp) + 8 * sum_i n_layers * d_attn * L_i^2
i.e. 6x (forward + backward) + 2x (reference forward) the matmul FLOPs of the non-embedding body on every real
token and of the lm_head on every response token, plus causal attention (QK^T and AV, 2 * 2 * d_attn * L^2 / 2 per
layer and sequence in the forward). MFU = F / time / peak, peak = a 2048^3 fp32 ``torch.matmul`` on one thread,
measured in this run (best of 5, before and after the rows; the higher, as other processes share the cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

QUICK = dict(N=2, G=4, vocab=2048, median=24, max_len=96, prompt_min=12, prompt_max=24, micro_seqs=4,
             micro_tokens=192, model="tiny")


def response_lengths(n: int, median: float, sigma: float, max_len: int, min_len: int = 16,
                     seed: int = 0) -> list[int]:
    """``n`` response lengths (tokens) from a log-normal (median ``median``, log-sd ``sigma``) clipped to
    [min_len, max_len]: most answers short, a few near the cap, as in tool-integrated RL rollouts."""
    rng = random.Random(seed)
    return [min(max_len, max(min_len, round(median * math.exp(sigma * rng.gauss(0.0, 1.0))))) for _ in range(n)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul throughput on one thread (GFLOP/s, best of ``repeats``)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------------- the workload
def build(args):
    """The model (seeded) and the batch as tirl ``Sample``s, identical in every child."""
    import torch

    from tirl.models.tiny import build_bench_model
    from tirl.rl.batch import Sample

    model, tok = build_bench_model(args.model, vocab_size=args.vocab)
    V = model.config.vocab_size
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    lengths = response_lengths(args.N * args.G, args.median, args.sigma, args.max_len, min(16, args.max_len), 0)
    samples = []
    for g in range(args.N):
        prompt = torch.randint(3, V, (rng.randint(args.prompt_min, args.prompt_max),), generator=gen).tolist()
        rewards = torch.randn(args.G, generator=gen)
        adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).tolist()
        for j in range(args.G):
            n = lengths[g * args.G + j]
            resp = torch.randint(3, V, (n,), generator=gen).tolist()
            # old log-probs near a random-init model's (~ -log V), so the ratio is near 1 as in a real first step
            old = (-math.log(V) + 0.05 * torch.randn(n, generator=gen)).tolist()
            samples.append(Sample(prompt, resp, [1] * n, old, [0.0] * n, adv[j], "episode", g))
    return model, tok, samples


def model_flops(model, samples) -> float:
    """The F of the module docstring (FLOPs of one update on this batch, padding and shared prompts not counted)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.model.parameters()) - emb              # non-embedding decoder params
    d_attn = cfg.num_attention_heads * cfg.head_dim
    t_all = sum(len(s.context) + len(s.response) for s in samples)
    t_resp = sum(len(s.response) for s in samples)
    attn = sum(cfg.num_hidden_layers * d_attn * (len(s.context) + len(s.response)) ** 2 for s in samples)
    return 8 * (body * t_all + cfg.hidden_size * cfg.vocab_size * t_resp) + 8 * attn


def warm_up(model) -> None:
    """One small forward/backward so lazy initialisation is not timed."""
    import torch

    ids = torch.randint(3, 100, (2, 32))
    model(input_ids=ids).logits.float().mean().backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------- tirl
def run_tirl(args, packing: bool, micro_tokens: int | None) -> dict:
    import torch

    from tirl.config.schema import (
        LoraConfig,
        LossConfig,
        MethodConfig,
        ModelConfig,
        RolloutConfig,
        SandboxConfig,
    )
    from tirl.models.reference import make_frozen_reference
    from tirl.modules.grpo import GRPOModule
    from tirl.rl.batch import collate_samples

    torch.set_num_threads(1)
    model, tok, samples = build(args)
    extra = {}
    if packing or micro_tokens is not None or "packing" in MethodConfig.__dataclass_fields__:
        extra = {"packing": packing, "micro_batch_tokens": micro_tokens}
    method = MethodConfig(group_size=args.G, rollout_batch_size=args.N, mini_batch_size=args.N,
                          micro_batch_size=args.micro_seqs, lr=1e-6, log_samples=0,
                          loss=LossConfig(kl_coef=args.beta, kl_kind="k3", agg="token-mean", clip_low=0.2,
                                          clip_high=0.2, dual_clip=None), **extra)
    rollout = RolloutConfig(max_new_tokens=args.max_len, max_total_tokens=args.max_len, temperature=1.0)

    class BenchModule(GRPOModule):
        """GRPOModule's own update, outside a Lightning Trainer: one process, our optimizer, no schedule."""

        global_step = 0
        global_rank = 0

        @property
        def trainer(self):
            return type("T", (), {"world_size": 1})()

        def optimizers(self):
            return self._opt

        def lr_schedulers(self):
            return None

        def manual_backward(self, loss):
            loss.backward()

    module = BenchModule(method, ModelConfig(name_or_path="bench", lora=LoraConfig(enabled=False)), rollout,
                         SandboxConfig(workers=1), tok)
    module.policy = model.train()
    module.frozen_ref = make_frozen_reference(model, args.beta)
    module._opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-6)
    tb = collate_samples(samples, tok.pad_token_id)
    groups = [(s.level, s.group) for s in samples]
    warm_up(model)
    before = rss_mb()
    t0 = time.perf_counter()
    with profiled(args):
        metrics = module.update(tb, groups)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "loss": metrics.get("loss"), "grad_norm": metrics.get("grad_norm"),
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------------- TRL
def run_trl(args) -> dict:
    """The same update through TRL's GRPOTrainer loss: ``_compute_loss`` + backward per micro-batch of the same rows
    (micro-batches of --micro-seqs sequences, in tirl's row order), the reference log-probs computed as TRL computes
    them (``_get_per_token_logps_and_entropies`` on ``ref_model`` under no_grad, timed), one AdamW step."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    model, tok, samples = build(args)
    tok.padding_side = "left"
    if args.beta > 0:   # TRL builds its reference from the policy's path: save the same weights for it to load
        path = os.path.join(args.tmp, "trl_ref_model")
        model.save_pretrained(path)
        model.config._name_or_path = path
    n, mbs = len(samples), args.micro_seqs
    ga = math.ceil(n / mbs)
    cfg = GRPOConfig(
        output_dir=args.tmp, per_device_train_batch_size=mbs, gradient_accumulation_steps=ga,
        num_generations=args.G, num_iterations=1, max_completion_length=args.max_len, beta=args.beta,
        epsilon=0.2, learning_rate=1e-6, temperature=1.0, loss_type="dapo", use_cpu=True, bf16=False,
        report_to="none", use_vllm=False, disable_tqdm=True, seed=0,
        logging_steps=1000, save_strategy="no",
    )
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": ["x"] * n}), processing_class=tok)
    trainer.current_gradient_accumulation_steps = ga
    policy = trainer.model.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    pad = tok.pad_token_id

    def inputs_for(rows: list) -> dict:
        P = max(len(s.context) for s in rows)
        C = max(len(s.response) for s in rows)
        d = {k: torch.full((len(rows), w), pad if "ids" in k else 0, dtype=torch.long)
             for k, w in (("prompt_ids", P), ("prompt_mask", P), ("completion_ids", C), ("completion_mask", C))}
        old = torch.zeros(len(rows), C)
        for i, s in enumerate(rows):      # prompts left-padded, completions right-padded, as TRL builds them
            d["prompt_ids"][i, P - len(s.context):] = torch.tensor(s.context)
            d["prompt_mask"][i, P - len(s.context):] = 1
            d["completion_ids"][i, :len(s.response)] = torch.tensor(s.response)
            d["completion_mask"][i, :len(s.response)] = 1
            old[i, :len(s.response)] = torch.tensor(s.old_log_probs)
        d["advantages"] = torch.tensor([s.advantage for s in rows])
        d["old_per_token_logps"] = old
        d["num_items_in_batch"] = torch.tensor(float(sum(len(s.response) for s in samples)))
        return d

    chunks = [samples[s:s + mbs] for s in range(0, n, mbs)]
    warm_up(policy)
    before = rss_mb()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with profiled(args):
        trl_micro_batches(trainer, policy, chunks, inputs_for, args, opt)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "loss": trainer._bench_loss, "grad_norm": trainer._bench_grad_norm,
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def trl_micro_batches(trainer, policy, chunks, inputs_for, args, opt) -> None:
    """Per micro-batch: TRL's reference log-probs (no grad), ``compute_loss``, backward; then clip and step."""
    import torch

    total = 0.0
    for rows in chunks:
        inputs = inputs_for(rows)
        if args.beta > 0:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with torch.no_grad():
                inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                    trainer.ref_model, ids, attn, inputs["completion_ids"].shape[1], batch_size=len(rows))[0]
        loss = trainer.compute_loss(policy, inputs)
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    trainer._bench_loss, trainer._bench_grad_norm = total, float(grad_norm)


@contextlib.contextmanager
def profiled(args):
    """With --profile: the torch.profiler's top operators by self CPU time of this update, printed to stderr."""
    if not args.profile:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- driver
def has_packing() -> bool:
    from tirl.config.schema import MethodConfig

    fields = MethodConfig.__dataclass_fields__
    return "packing" in fields and "micro_batch_tokens" in fields


def has_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def configurations(args) -> list[tuple[str, str, dict]]:
    """(setting, implementation, child arguments) of every row of the table, in print order."""
    rows = []
    packing = has_packing()
    if not packing:
        print("this tirl has no method.packing / method.micro_batch_tokens yet: timing the padded update only.",
              file=sys.stderr)
    seq = f"(a) {args.micro_seqs} seqs/micro-batch"
    rows.append((seq, "tirl padded", {"impl": "tirl", "packing": False, "micro_tokens": None}))
    if packing:
        rows.append((seq, "tirl packed", {"impl": "tirl", "packing": True, "micro_tokens": None}))
    if has_trl():
        rows.append((seq, "TRL", {"impl": "trl"}))
    else:
        print("trl is not installed: no TRL row (`pip install trl --no-deps` beside this torch/transformers).",
              file=sys.stderr)
    if packing:
        tok = f"(b) {args.micro_tokens} tokens/micro-batch"
        rows.append((tok, "tirl padded", {"impl": "tirl", "packing": False, "micro_tokens": args.micro_tokens}))
        rows.append((tok, "tirl packed", {"impl": "tirl", "packing": True, "micro_tokens": args.micro_tokens}))
    return rows


def child(args) -> dict:
    spec = json.loads(args.child)
    if spec["impl"] == "trl":
        return run_trl(args)
    return run_tirl(args, spec["packing"], spec["micro_tokens"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes: " + json.dumps(QUICK))
    ap.add_argument("--model", default="bench-40m", help="a tirl.models.tiny.BENCH_MODELS name")
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary size of the benchmark model")
    ap.add_argument("--N", type=int, default=4, help="prompts (8 = the issue's 8 x 8: about twice the time)")
    ap.add_argument("--G", type=int, default=8, help="samples per prompt")
    ap.add_argument("--median", type=float, default=250, help="median response length (tokens)")
    ap.add_argument("--sigma", type=float, default=0.9, help="log-sd of the response lengths")
    ap.add_argument("--max-len", type=int, default=2000, help="longest response (tokens)")
    ap.add_argument("--prompt-min", type=int, default=150)
    ap.add_argument("--prompt-max", type=int, default=300)
    ap.add_argument("--micro-seqs", type=int, default=2, help="sequences per micro-batch in setting (a)")
    ap.add_argument("--micro-tokens", type=int, default=2048, help="token budget per micro-batch in setting (b)")
    ap.add_argument("--beta", type=float, default=0.001, help="KL coefficient; 0 = no reference pass")
    ap.add_argument("--only", help="run only the rows whose implementation contains this text (e.g. packed)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--tmp", default="/tmp/tirl_bench_update", help="scratch folder (TRL's reference checkpoint)")
    ap.add_argument("--profile", action="store_true",
                    help="run each row under torch.profiler and print its top operators (slower; use with --only)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import torch  # noqa: F401  (the parent only measures the matmul peak and counts FLOPs)

    peak = matmul_peak_gflops()    # measured again after the rows; the higher (the less disturbed) is the peak
    model, _, samples = build(args)
    flops = model_flops(model, samples)
    n_params = sum(p.numel() for p in model.parameters())
    lengths = sorted(len(s.response) for s in samples)
    t_all = sum(len(s.context) + len(s.response) for s in samples)
    del model
    results = []
    for setting, impl, spec in configurations(args):
        if args.only and args.only not in impl:
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", json.dumps(spec)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{setting} {impl} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return done.returncode
        if args.profile:
            print(f"--- {setting} {impl}: top operators by self CPU time\n{done.stderr}", file=sys.stderr)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r.update(setting=setting, impl=impl, tokens_per_s=t_all / r["seconds"],
                 mfu=flops / r["seconds"] / (peak * 1e9), update_mb=r["peak_rss_mb"] - r["rss_before_mb"])
        results.append(r)
        print(f"  done: {setting} {impl}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    peak = max(peak, matmul_peak_gflops())
    for r in results:
        r["mfu"] = flops / r["seconds"] / (peak * 1e9)

    workload = {
        "model": f"{args.model} ({n_params / 1e6:.1f} M params, vocab {args.vocab}, fp32, full FT)",
        "batch": f"{args.N} prompts x {args.G} samples; prompts {args.prompt_min}-{args.prompt_max} tokens; responses "
                 f"log-normal median {args.median:g}, sigma {args.sigma:g}, max {args.max_len} (this draw: min "
                 f"{lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}, total {sum(lengths)})",
        "real_tokens": t_all, "model_flops": flops, "matmul_peak_gflops": peak,
        "update": f"1 optimizer step, policy fwd+bwd + reference fwd (beta={args.beta}, frozen copy), 1 thread",
    }
    print("\n".join(f"{k}: {v}" for k, v in workload.items() if k != "model_flops"))
    print(f"model FLOPs of the update: {flops / 1e12:.2f} TFLOP; fp32 matmul peak (1 thread): {peak:.1f} GFLOP/s")
    print(f"{'setting':28} {'impl':12} {'s':>7} {'tokens/s':>9} {'MFU':>6} {'peak RSS MB':>12} {'update MB':>10} {'loss':>10} {'grad norm':>10}")
    for r in results:
        print(f"{r['setting']:28} {r['impl']:12} {r['seconds']:7.1f} {r['tokens_per_s']:9.0f} {r['mfu']:6.1%} "
              f"{r['peak_rss_mb']:12.0f} {r['update_mb']:10.0f} {r['loss']:10.6f} {r['grad_norm']:10.6f}")
    ratios = {}
    by = {(r["setting"][:3], r["impl"]): r for r in results}
    for s in ("(a)", "(b)"):
        pad, pk = by.get((s, "tirl padded")), by.get((s, "tirl packed"))
        if pad and pk:
            ratios[f"{s} packed/padded tokens/s"] = pk["tokens_per_s"] / pad["tokens_per_s"]
            ratios[f"{s} packed/padded update MB"] = pk["update_mb"] / max(pad["update_mb"], 1e-9)
            ratios[f"{s} packed/padded peak RSS"] = pk["peak_rss_mb"] / pad["peak_rss_mb"]
        if s == "(a)" and by.get((s, "TRL")):
            for impl in ("tirl padded", "tirl packed"):
                if by.get((s, impl)):
                    ratios[f"(a) {impl}/TRL tokens/s"] = by[(s, impl)]["tokens_per_s"] / by[(s, "TRL")]["tokens_per_s"]
    for k, v in ratios.items():
        print(f"{k:36} {v:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": workload, "results": results, "ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
