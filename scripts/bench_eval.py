"""Wall time and throughput of evaluation with the tiny model on the CPU, through the real entry point.

    python scripts/bench_eval.py [--limit 50] [--max-new-tokens 128]

Two passes: BFCL AST `simple` (the installed bfcl-eval data, first --limit entries, greedy) and a MATH500-format
pass (the hub file when it is cached, else a local file of --limit generated arithmetic problems), one sample per
problem, tool-integrated with the local sandbox. Prints a table of wall time, items/s and generated tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hydra import compose, initialize_config_dir  # noqa: E402

from tirl.config import CONFIG_DIR, runnable  # noqa: E402


def compose_eval(overrides: list[str], out_dir: Path):
    cfg = compose("eval", overrides=overrides, return_hydra_config=True)
    return runnable(cfg, str(out_dir))


def math_file(directory: Path, n: int) -> Path:
    path = directory / "math500.jsonl"
    with path.open("w") as handle:
        for i in range(n):
            a, b = 17 * i + 3, 11 * i + 5
            handle.write(json.dumps({"problem": f"Compute {a} * {b} + {i}.", "answer": str(a * b + i),
                                     "unique_id": f"gen/{i}"}) + "\n")
    return path


def timed_pass(name: str, overrides: list[str], out_dir: Path, items: int) -> dict:
    from tirl.evaluate import run

    start = time.perf_counter()
    run(compose_eval(overrides + [f"task.out_dir={out_dir}"], out_dir))
    wall = time.perf_counter() - start
    task = "math" if "task=math" in overrides else "bfcl"
    tokens = json.loads((out_dir / f"{task}_results.json").read_text())["generated_tokens"]
    return {"pass": name, "items": items, "wall_s": wall, "items_per_s": items / wall, "tokens": tokens,
            "tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    common = ["model.name_or_path=tiny", "device=cpu", "logger=none", f"rollout.max_new_tokens={args.max_new_tokens}",
              f"rollout.max_total_tokens={2 * args.max_new_tokens}", "rollout.max_prompt_tokens=768",
              f"task.batch_size={args.batch_size}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        root = Path(tmp)
        from tirl.benchmarks.bfcl_score import bfcl_available

        if bfcl_available():
            rows.append(timed_pass(f"BFCL simple (limit {args.limit})",
                                   common + ["task=bfcl", "task.categories=[simple]", f"task.limit={args.limit}"],
                                   root / "bfcl", args.limit))
        else:
            print("bfcl-eval not installed (scripts/install_bfcl.sh): BFCL pass skipped")
        try:
            from tirl.benchmarks.math_bench import load_benchmark

            load_benchmark("math500", limit=1)
            math_source = ["bench=[math500]"]
        except Exception:
            math_source = ["bench=[math500]", f"task.bench_dir={math_file(root, args.limit).parent}"]
        rows.append(timed_pass(f"MATH500 format (limit {args.limit})",
                               common + ["task=math", f"task.limit={args.limit}", "sandbox.workers=2"] + math_source,
                               root / "math", args.limit))
    print(f"\n{'pass':<32} {'items':>6} {'wall s':>8} {'items/s':>8} {'gen tokens':>10} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['pass']:<32} {r['items']:>6} {r['wall_s']:>8.1f} {r['items_per_s']:>8.2f} {r['tokens']:>10} "
              f"{r['tokens_per_s']:>9.0f}")


if __name__ == "__main__":
    main()
