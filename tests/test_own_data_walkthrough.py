"""The README's "Your own data" walk-through runs as written: SFT -> THOR (LoRA) -> export -> evaluate.

The commands are read out of the README (between the ``own-data:begin``/``own-data:end`` markers), so the test
runs exactly what a user copies. They run in a temporary directory that links ``src/``, ``configs/`` and
``tests/fixtures/`` of this checkout, so the relative paths in the README resolve and the runs' ``logs/`` land
there, not in the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- own-data:begin -->", "<!-- own-data:end -->"


def readme_commands() -> list[str]:
    """The walk-through's commands, one string each (backslash continuations joined, comments dropped)."""
    text = README.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README needs one own-data:begin/end marker pair"
    block = text[text.index(BEGIN) + len(BEGIN): text.index(END)]
    match = re.fullmatch(r"\s*```bash\n(.*?)```\s*", block, flags=re.S)
    assert match, "the own-data markers must enclose exactly one ```bash block"
    joined = re.sub(r"\\\n\s*", " ", match.group(1))
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def overrides(command: str) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in shlex.split(command)[2:] if "=" in arg)


def test_readme_walkthrough_is_sft_rl_export_eval_on_existing_files():
    """The block is the four stages in order, each chained to the previous one's output, on files that exist."""
    commands = readme_commands()
    scripts = [shlex.split(c)[:2] for c in commands]
    assert scripts == [["python", "src/train.py"], ["python", "src/train.py"], ["python", "src/export.py"],
                       ["python", "src/eval.py"]]
    sft, rl, export, evaluate = (overrides(c) for c in commands)
    assert sft["method"] == "sft" and rl["method"] == "thor" and evaluate["task"] == "math"
    assert rl["init_from"] == f"{sft['hydra.run.dir']}/checkpoints/last.ckpt"
    assert export["ckpt"] == f"{rl['hydra.run.dir']}/checkpoints/last.ckpt"
    assert evaluate["init_from"] == export["out"]
    for path in (sft["data.train"], rl["data.train"], f"{evaluate['task.bench_dir']}/math500.jsonl"):
        assert (ROOT / path).is_file(), path
        assert path.startswith("tests/fixtures/own_data/"), "the walk-through uses the hand-written files only"


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    """Each README command exits 0 and leaves what the README says: checkpoints, an HF directory that plain
    transformers loads and generates with (the LoRA merged in), and the benchmark's results."""
    for rel in ("src", "configs", "tests/fixtures"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(ROOT / rel)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    commands = readme_commands()
    outputs, timings = [], []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        timings.append(round(time.monotonic() - start, 1))
        assert proc.returncode == 0, f"{command}\nexited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout + proc.stderr)
    print("timings (s):", timings)
    sft, rl, export, evaluate = (overrides(c) for c in commands)

    # SFT and RL: a checkpoint, and the held-out score before and after training (a fifth of the file held out)
    for run, log in ((sft, outputs[0]), (rl, outputs[1])):
        assert (tmp_path / run["hydra.run.dir"] / "checkpoints" / "last.ckpt").is_file()
        assert "holding out" in log and "Before training: {'val/" in log and "After training: {'val/" in log
    assert (tmp_path / rl["hydra.run.dir"] / "csv" / "train_samples.csv").is_file()

    # export: an HF directory plain transformers loads, with the adapter merged (no LoRA weights left)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = tmp_path / export["out"]
    assert "(full weights, LoRA adapter merged in)" in outputs[2]
    weights = load_file(str(hf_dir / "model.safetensors"))
    assert weights and not [k for k in weights if "lora" in k.lower()]
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]

    # eval: math_results.json and .md in the run directory, every problem of the hand-written benchmark scored
    eval_dir = tmp_path / evaluate["hydra.run.dir"]
    results = json.loads((eval_dir / "math_results.json").read_text())
    assert (eval_dir / "math_results.md").is_file()
    n_problems = sum(1 for line in (ROOT / evaluate["task.bench_dir"] / "math500.jsonl").open() if line.strip())
    assert results["results"]["math500"]["problems"] == n_problems == 4
    assert 0.0 <= results["results"]["math500"]["avg@1"] <= 100.0
