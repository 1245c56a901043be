"""Peak extra memory and time of tirl's chunked token_logprobs / token_entropy vs the naive log_softmax.

    python scripts/bench_logprobs.py                 # 4,096 x 151,936 fp32 logits (2.5 GB), forward + backward
    python scripts/bench_logprobs.py --no-backward   # forward only (faster)

Each measurement runs in a fresh subprocess so the high-water mark is its own: on CPU the peak is the
growth of ru_maxrss after the logits exist, on CUDA torch.cuda.max_memory_allocated. Forward runs with
grad enabled, as in training, so whatever the implementation saves for backward counts. The backward
necessarily allocates the logits-sized gradient; its figure is shown but only the forward is gated.
Exits 1 if tirl's forward peak exceeds --max-ratio x the logits' bytes (logits included).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tirl.rl.core import token_entropy, token_logprobs


def naive_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, -1)
    return -(log_p.exp() * log_p).sum(-1)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(impl: str, quantity: str, rows: int, vocab: int, backward: bool) -> dict:
    """Runs in the child: allocate logits, run one function (and its backward), report bytes and seconds."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn = {("naive", "logprobs"): lambda x, i: naive_logprobs(x, i),
          ("tirl", "logprobs"): lambda x, i: token_logprobs(x, i),
          ("naive", "entropy"): lambda x, i: naive_entropy(x),
          ("tirl", "entropy"): lambda x, i: token_entropy(x)}[(impl, quantity)]
    fn(torch.randn(4, 8, device=device, requires_grad=True), torch.zeros(4, dtype=torch.long, device=device))

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(rows, vocab, device=device)  # [T, V] fp32
    # A broadcast sum fills every page (so RSS counts it) without a second full-size temporary.
    torch.add(3 * torch.randn(rows, 1, device=device, generator=gen),
              2 * torch.randn(1, vocab, device=device, generator=gen), out=logits)
    logits.requires_grad_(True)
    ids = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else _peak_bytes(device)

    start = time.perf_counter()
    out = fn(logits, ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    fwd_s = time.perf_counter() - start
    fwd_peak = _peak_bytes(device) - base
    result = {"fwd_extra": fwd_peak, "fwd_s": fwd_s, "checksum": float(out.detach().double().sum())}
    if backward:
        start = time.perf_counter()
        out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result |= {"bwd_extra": _peak_bytes(device) - base, "bwd_s": time.perf_counter() - start}
    result |= {"logits_bytes": logits.numel() * logits.element_size(), "device": str(device)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--no-backward", dest="backward", action="store_false")
    parser.add_argument("--max-ratio", type=float, default=1.5, help="gate on tirl's (logits + extra) / logits")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "QUANTITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.rows, args.vocab, args.backward)))
        return 0

    started = time.perf_counter()
    results: dict[tuple[str, str], dict] = {}
    for quantity in ("logprobs", "entropy"):
        for impl in ("naive", "tirl"):
            cmd = [sys.executable, __file__, "--child", impl, quantity, "--rows", str(args.rows),
                   "--vocab", str(args.vocab)] + ([] if args.backward else ["--no-backward"])
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                raise RuntimeError(f"the {impl} {quantity} measurement failed (exit {done.returncode}); see stderr above.")
            results[(impl, quantity)] = json.loads(done.stdout.strip().splitlines()[-1])

    first = next(iter(results.values()))
    gib = first["logits_bytes"] / 2**30
    print(f"logits {args.rows} x {args.vocab} fp32 = {gib:.2f} GiB on {first['device']}")
    header = f"{'quantity':9} {'impl':6} {'fwd extra GiB':>13} {'fwd peak/logits':>15} {'fwd s':>7}"
    if args.backward:
        header += f" {'fwd+bwd peak/logits':>19} {'bwd s':>7}"
    print(header)
    failed = False
    for (impl, quantity), r in results.items():
        ratio = 1 + r["fwd_extra"] / r["logits_bytes"]
        line = f"{quantity:9} {impl:6} {r['fwd_extra'] / 2**30:13.3f} {ratio:15.3f} {r['fwd_s']:7.2f}"
        if args.backward:
            line += f" {1 + r['bwd_extra'] / r['logits_bytes']:19.3f} {r['bwd_s']:7.2f}"
        print(line)
        failed |= impl == "tirl" and ratio > args.max_ratio
    for quantity in ("logprobs", "entropy"):
        naive, ours = results[("naive", quantity)]["checksum"], results[("tirl", quantity)]["checksum"]
        agree = abs(naive - ours) <= 1e-5 * max(1.0, abs(naive))
        print(f"{quantity} sums: naive {naive:.6g} tirl {ours:.6g} ({'agree' if agree else 'DISAGREE'})")
        failed |= not agree
    print(f"total time {time.perf_counter() - started:.1f} s; gate: tirl forward peak/logits <= {args.max_ratio}"
          f" -> {'FAIL' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
