"""Does RL learn? THOR vs plain GRPO on math and D-CORE (DA-GRPO) vs plain GRPO on function calling, on the warm
tiny model, same budget, several seeds. Every run is the real entry point (``python src/train.py …``); held-out
accuracy (``val/acc``: Avg@k at the rollout temperature, T=1, on held-out synthetic problems) is read back from each
run's metrics CSV.

Writes ``<out>/curves.csv`` (task, method, seed, step, val_acc), ``<out>/curves_by_kind.csv`` (the same per BFCL
category or math level), ``<out>/curves.png`` and prints, per task and method, the mean held-out accuracy before and
after RL, the gain, and before/after per category or level.

    python scripts/learning_curves.py [--seeds 0 1 2] [--steps N] [--tasks math toolcall] [--jobs 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Same budget within a task: the baseline is the method's own preset with only the method swapped for GRPO.
RUNS = {
    "math": {
        "thor": ["experiment=thor_tiny"],
        "grpo": ["experiment=thor_tiny", "method=grpo"],
    },
    "toolcall": {
        "dcore": ["experiment=dcore_tiny"],
        "grpo": ["experiment=dcore_tiny", "method=grpo", "method.reward.name=toolcall"],
    },
}


def run_one(task: str, method: str, seed: int, args, out: Path) -> Path:
    run_dir = out / task / method / f"seed{seed}"
    metrics = run_dir / "csv" / "metrics.csv"
    if metrics.exists() and not args.force:
        return run_dir
    shared = [f"seed={seed}", f"trainer.val_check_interval={args.val_every}", f"data.val_size={args.val_size}", f"method.val_samples={args.val_samples}", "test=false", "logger=csv", "callbacks=none",
              "method.log_samples=0", f"hydra.run.dir={run_dir}", f"paths.output_dir={run_dir}"]
    if args.steps is not None:
        shared.append(f"trainer.max_steps={args.steps}")
    if args.lr is not None:
        shared.append(f"method.lr={args.lr}")
    if args.model is not None:
        shared.append(f"model.name_or_path={args.model}")
    # the group keys that must match across the two methods of a task (the baseline inherits the preset's)
    match = [f"method.group_size={args.group_size}"]
    if args.prompts is not None:
        match.append(f"method.rollout_batch_size={args.prompts}")
    cmd = [sys.executable, str(ROOT / "src/train.py"), *RUNS[task][method], *match, *shared]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task}/{method}/seed{seed} failed:\n{proc.stderr[-3000:]}")
    print(f"  {task:8s} {method:6s} seed {seed}: {time.time() - t0:5.0f}s", flush=True)
    return run_dir


def read_kinds(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, kind, accuracy) from the run's ``val/acc/<category or level>`` columns."""
    points = {}   # as read_curve: a later validation logged at the same step replaces an earlier one
    for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()):
        points.update({(int(r["step"]), k.split("/", 2)[2]): float(v) for k, v in r.items() if k.startswith("val/acc/") and v})
    return sorted((step, kind, acc) for (step, kind), acc in points.items())


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    points = {}
    for r in rows:
        if r.get("val/acc"):
            points[int(r["step"])] = float(r["val/acc"])
    return sorted(points.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["math", "toolcall"], choices=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None,
                   help="RL steps of every run (default: the presets': 60 for math, 180 for function calling)")
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--val-size", type=int, default=128, help="held-out prompts")
    p.add_argument("--val-samples", type=int, default=8, help="samples per held-out prompt (Avg@k)")
    p.add_argument("--lr", type=float, default=None, help="override both methods' lr (default: the presets')")
    p.add_argument("--model", default=None,
                   help="start every run from this checkpoint (HF directory or id; default: the presets' tiny-warm)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=None,
                   help="prompts per step (default: the presets': 8 for math, 16 for function calling)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
    p.add_argument("--out", type=Path, default=ROOT / "logs/learning_curves")
    p.add_argument("--force", action="store_true", help="rerun runs whose metrics already exist")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    jobs = [(t, m, s) for t in args.tasks for m, s in itertools.product(RUNS[t], args.seeds)]
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda j: run_one(*j, args, args.out), jobs))
    print(f"all runs: {time.time() - t0:.0f}s")

    table, kinds = [], []
    for (task, method, seed), d in zip(jobs, dirs):
        table += [(task, method, seed, step, acc) for step, acc in read_curve(d)]
        kinds += [(task, method, seed, step, kind, acc) for step, kind, acc in read_kinds(d)]
    with (args.out / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seed", "step", "val_acc"])
        w.writerows(table)
    with (args.out / "curves_by_kind.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seed", "step", "kind", "val_acc"])
        w.writerows(kinds)

    print(f"\n{'task':9s} {'method':7s} {'before':>7s} {'after':>7s} {'gain':>7s}   (held-out Avg@{args.val_samples} accuracy, mean of {len(args.seeds)} seeds)")
    summary = {}
    for task in args.tasks:
        for method in RUNS[task]:
            curves = [[a for (t, m, s, _, a) in table if (t, m, s) == (task, method, seed)] for seed in args.seeds]
            before = sum(c[0] for c in curves) / len(curves)
            after = sum(c[-1] for c in curves) / len(curves)
            summary[(task, method)] = (before, after)
            print(f"{task:9s} {method:7s} {before:7.3f} {after:7.3f} {after - before:+7.3f}")
    print_by_kind(kinds, args)
    plot(table, args)
    print(f"\nwrote {args.out / 'curves.csv'}, {args.out / 'curves_by_kind.csv'} and {args.out / 'curves.png'}")


def print_by_kind(kinds, args) -> None:
    """Before/after per BFCL category or math level (mean of seeds): where the overall gain comes from."""
    if not kinds:
        return
    print(f"\nper category / level (mean of {len(args.seeds)} seeds):")
    for task in args.tasks:
        for method in RUNS[task]:
            rows = [(s, st, k, a) for (t, m, s, st, k, a) in kinds if (t, m) == (task, method)]
            first, last = min(st for _, st, _, _ in rows), max(st for _, st, _, _ in rows)
            cells = []
            for kind in sorted({k for _, _, k, _ in rows}):
                b = [a for (_, st, k, a) in rows if k == kind and st == first]
                e = [a for (_, st, k, a) in rows if k == kind and st == last]
                cells.append(f"{kind} {sum(b) / len(b):.2f}->{sum(e) / len(e):.2f}")
            print(f"  {task:9s} {method:7s} " + ", ".join(cells))


def plot(table, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.tasks), figsize=(6 * len(args.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        for color, method in zip(("tab:red", "tab:blue"), RUNS[task]):
            steps = sorted({st for (t, m, _, st, _) in table if (t, m) == (task, method)})
            for seed in args.seeds:
                pts = [(st, a) for (t, m, s, st, a) in table if (t, m, s) == (task, method, seed)]
                ax.plot(*zip(*pts), color=color, alpha=0.25, lw=1)
            mean = [sum(a for (t, m, _, st, a) in table if (t, m, st) == (task, method, x)) / len(args.seeds) for x in steps]
            ax.plot(steps, mean, color=color, lw=2.5, label=f"{method} (mean of {len(args.seeds)})")
        ax.set_title(f"{task}: held-out accuracy (tiny model, CPU)")
        ax.set_xlabel("RL step")
        ax.set_ylabel(f"val/acc (Avg@{args.val_samples}, rollout temperature)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)


if __name__ == "__main__":
    main()
