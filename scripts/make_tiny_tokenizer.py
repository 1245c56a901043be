"""Build the tiny model's tokenizer that tirl ships in ``src/tirl/assets/tiny``.

Byte-level BPE (any text encodes, nothing is ever <unk>) with 1,024 entries: 256 bytes, the Qwen special tokens,
and merges learnt on a seeded corpus shaped like tirl's synthetic tasks (math word problems, Python, BFCL call
lists) plus the synthetic tasks' own text (``task_corpus``: problems, solutions, tool-call prompts and answers).
Without the latter the catalogue's words split into letters (a tool-call prompt was 306 tokens at 512 entries; it
is about 106 now), and the tiny model has to copy argument values letter by letter. Digits are split one by one,
as in Qwen, so arithmetic stays learnable. Rerunning the script reproduces the committed files byte for byte; it
must be rerun (and the warm checkpoint rebuilt) when the synthetic tasks' text changes.

    python scripts/make_tiny_tokenizer.py [--out src/tirl/assets/tiny]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tirl.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, TINY_VOCAB_SIZE

WORDS = (
    "the a of to and in is are was has have how many much what each total more less than left after before "
    "buys sells gives gets makes needs costs apples books coins cards pens boxes marbles tickets students days "
    "hours minutes price sum product difference number numbers integer value answer compute find result "
    "call function weather city units get set send search book flight user query location date time email "
    "please help want need can you could would should first then next finally task sub so we let"
).split()
PY = [
    "print({a} + {b})", "print({a} * {b} - {c})", "x = {a}\ny = {b}\nprint(x * y)", "import math\nprint(math.gcd({a}, {b}))",
    "total = 0\nfor i in range(1, {a}):\n    total += i\nprint(total)", "from sympy import *\nprint(factorint({a}))",
    "def f(n):\n    return n * n\nprint(f({a}))", "if {a} > {b}:\n    print({a})\nelse:\n    print({b})",
]
CALLS = [
    '[get_weather(city="{w}", units="celsius")]', "[add(a={a}, b={b}), multiply(a={b}, b={c})]",
    '[search_books(query="{w}", limit={a})]', '[send_email(to="{w}@example.com", subject="{w}")]',
]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(1, 50)
        w = rng.choice(WORDS)
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        out.append(f"{sentence.capitalize()} {a} {w} and {b} more. What is the {w}?")
        out.append("```python\n" + rng.choice(PY).format(a=a, b=b, c=c) + "\n```\n```output\n" + str(a * b) + "\n```")
        out.append(rng.choice(CALLS).format(a=a, b=b, c=c, w=w))
        out.append(f"The answer is \\boxed{{{a * b - c}}}. Let me check: {a} * {b} = {a * b}, so {a * b} - {c}.")
        out.append(json.dumps({"name": w, "arguments": {"x": a, "y": w}}))
    return out


def task_corpus(n: int, seed: int = 0) -> list[str]:
    """Text of the synthetic tasks themselves: math problems and solutions, tool-call prompts and answers."""
    from tirl.data.prompts import toolcall_system_prompt
    from tirl.data.synthetic_math import problem_at, solution_text
    from tirl.data.synthetic_toolcall import target_text, task_at

    out = []
    for i in range(n):
        problem = problem_at(seed, i)
        out += [problem.question, solution_text(problem, problem.answer)]
        task = task_at(seed, i)
        out += [toolcall_system_prompt([f.tool() for f in task.tools]), task.query, target_text(task)]
    return out


def build(out: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(4000) + task_corpus(2000), trainer=trainer)
    assert tok.get_vocab_size() == TINY_VOCAB_SIZE, tok.get_vocab_size()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/tirl/assets/tiny")
    build(p.parse_args().out)
