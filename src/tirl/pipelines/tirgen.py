"""THOR's TIRGen: tool-integrated reasoning data from an actor, a critic and a sandbox (DESIGN.md, "TIRGen").

The actor (the policy) writes one reasoning step at a time (a step ends at a blank line). The critic sees that
step only — never the problem or the answer — and either says it is not code (``NO``) or rewrites it as a
self-contained ```python block that prints its result. The sandbox runs the block; its REAL output, as an
```output block, replaces whatever the actor predicted, and the actor continues from the rewritten step.
Finished samples pass the filters (each drop counted); then one sample per problem is kept and 1-call samples
are down-sampled. Who wrote what is recorded, never re-parsed: each output block's character span is kept as the
sample's ``env_spans`` (no SFT loss there, whatever the output prints), and the answer, repetition and format
filters read only the text the actor and critic wrote.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from tirl.data.chat_template import model_written_text
from tirl.pipelines.chat_backends import ChatBackend, ChatParams
from tirl.pipelines.runner import ItemResult
from tirl.rewards.math import last_boxed, math_equal
from tirl.rewards.repetition import has_heavy_repetition
from tirl.tools.text_format import CODE_BLOCK, code_block, output_block

ACTOR_SYSTEM = "Solve the problem step by step. Separate steps by a blank line. Put the final answer in \\boxed{}."
CRITIC_SYSTEM = (
    "You see one step of a math solution. If the step computes something that Python can compute, rewrite it as "
    "one self-contained ```python block that prints the result. Otherwise reply NO."
)
STEP_END = "\n\n"
_ANY_BLOCK = re.compile(r"```(?:python|output)\n.*?\n```\n?", re.S)
LIBRARIES = ("math", "sympy", "numpy", "np", "sp", "fractions", "itertools", "collections", "functools", "statistics")


def stable_seed(*parts: object) -> int:
    """A seed from values, identical across processes and runs (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@dataclass
class CodeCall:
    code: str
    passed: bool
    output: str
    span: tuple[int, int] = (0, 0)      # [start, end) of its ```output block in the sample text (the environment's)


@dataclass
class TIRGenSettings:
    actor_params: ChatParams
    critic_params: ChatParams
    max_steps: int = 12
    min_chars: int = 20
    max_chars: int = 8000
    max_thin_fraction: float = 0.4
    one_call_keep_prob: float = 0.5
    require_code: bool = True
    extra_filters: dict = field(default_factory=dict)


def critic_code(reply: str) -> str | None:
    """The critic's rewrite, or None when it says the step is not code."""
    m = CODE_BLOCK.search(reply)
    return m.group(1).strip() if m and m.group(1).strip() else None


def is_thin(code: str) -> bool:
    """A block with neither a library call (import or module attribute) nor a loop/branch, e.g. print(2+3)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return True
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.For, ast.While, ast.If, ast.IfExp, ast.comprehension)):
            return False
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in LIBRARIES:
            return False
    return True


def formatting_balanced(text: str, n_calls: int | None = None) -> bool:
    """Fences pair up, every code block is followed by its output, think tags and braces balance.

    ``text`` is the model-written text (output blocks left out; see `model_written_text`) when ``n_calls`` is
    given: then each of the ``n_calls`` recorded outputs answers one ```python block. Without ``n_calls`` the
    output blocks are counted in ``text`` itself (a hand-written sample)."""
    n_outputs = text.count("```output") if n_calls is None else n_calls
    if text.count("```") % 2 or text.count("```python") != n_outputs:
        return False
    if text.count("<think>") != text.count("</think>"):
        return False
    depth = 0
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def rewrite_step(step: str, code: str, output: str) -> str:
    """The step's prose (any code or predicted output the actor wrote removed) + the critic's code + the real output
    (the output block is the step's tail: ``output_block(output)``)."""
    prose = _ANY_BLOCK.sub("", step).rstrip()
    head = prose + "\n" if prose else ""
    return f"{head}{code_block(code)}\n{output_block(output)}"


def filter_reason(text: str, gold: str, calls: list[CodeCall], s: TIRGenSettings) -> str | None:
    """The first filter a finished sample fails, or None when it passes them all (order = report order).

    The answer, repetition and format filters read the model-written text only (``calls``' output spans left out):
    a sandbox output that prints ``\\boxed{}``, fences or ``</think>`` is neither the answer nor a format fault."""
    own = model_written_text(text, [c.span for c in calls])
    pred = last_boxed(own)
    if pred is None:
        return "no_answer"
    if not math_equal(pred, gold):
        return "wrong_answer"
    if s.require_code and not calls:
        return "no_code"
    if any(not c.passed for c in calls):
        return "failed_call"
    if len(text) < s.min_chars:
        return "too_short"
    if len(text) > s.max_chars:
        return "too_long"
    if calls:
        thin = [is_thin(c.code) for c in calls]
        if all(thin) or sum(thin) / len(thin) > s.max_thin_fraction:
            return "trivial_code"
    if has_heavy_repetition(own):
        return "repetition"
    if not formatting_balanced(own, len(calls)):
        return "unbalanced_format"
    return None


class TIRGenerator:
    def __init__(self, actor: ChatBackend, critic: ChatBackend, sandbox, settings: TIRGenSettings, seed: int = 0):
        self.actor, self.critic, self.sandbox, self.settings, self.seed = actor, critic, sandbox, settings, seed

    def _params(self, base: ChatParams, *key: object) -> ChatParams:
        return ChatParams(**{**base.__dict__, "seed": stable_seed(self.seed, *key)})

    def generate(self, rec: dict) -> tuple[str, list[CodeCall], bool]:
        """(assistant text, code calls, finished) for one problem."""
        s = self.settings
        prompt = [{"role": "system", "content": ACTOR_SYSTEM}, {"role": "user", "content": rec["messages"][-1]["content"]}]
        text, calls = "", []
        for step_no in range(s.max_steps):
            messages = prompt + ([{"role": "assistant", "content": text, "env_spans": [list(c.span) for c in calls]}]
                                 if text else [])
            actor_params = self._params(s.actor_params, rec["id"], "actor", step_no)
            actor_params.stop = [STEP_END]
            step = self.actor.complete(messages, actor_params)[0].strip("\n")
            if not step.strip():
                return text.rstrip(), calls, False
            if last_boxed(step) is not None:  # the answer step is kept as written
                return text + step, calls, True
            critic_reply = self.critic.complete(  # one step only: never the problem or the answer
                [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": step}],
                self._params(s.critic_params, rec["id"], "critic", step_no))[0]
            code = critic_code(critic_reply)
            if code is not None:
                result = self.sandbox.run(code)
                output = result.feedback()
                step = rewrite_step(step, code, output)
                end = len(text) + len(step)                      # the output block is the step's tail
                calls.append(CodeCall(code, result.passed, output,
                                      (end - len(output_block(output)), end)))
            text += step + STEP_END
        return text.rstrip(), calls, False

    def __call__(self, rec: dict) -> ItemResult:
        text, calls, finished = self.generate(rec)
        info = {"code_calls": len(calls)}
        if not finished:
            return ItemResult("dropped", "unfinished", info=info)
        reason = filter_reason(text, str(rec["answer"]), calls, self.settings)
        if reason:
            return ItemResult("dropped", reason, info=info)
        prompt = [m for m in rec["messages"]]
        turn = {"role": "assistant", "content": text, "env_spans": [list(c.span) for c in calls]}
        sample = {"task": rec.get("task", "math"), "messages": prompt + [turn], "loss_on": "last_assistant",
                  "problem": rec.get("problem_key", rec["messages"][-1]["content"]), "code_calls": len(calls)}
        return ItemResult("kept", "", [sample], info)


def select_samples(finished: list[dict], one_call_keep_prob: float, seed: int) -> tuple[list[dict], Counter]:
    """One sample per problem (the first, in input order), then keep each 1-call sample with probability p.

    Returns the samples and the selection's drop counts (items turned from kept to dropped)."""
    seen: set[str] = set()
    out, dropped = [], Counter()
    for rec in finished:
        for sample in rec["samples"]:
            if sample["problem"] in seen:
                dropped["duplicate_problem"] += 1
                continue
            if sample["code_calls"] == 1 and random.Random(stable_seed(seed, rec["id"])).random() >= one_call_keep_prob:
                dropped["one_call_downsampled"] += 1
                continue
            seen.add(sample["problem"])
            out.append(sample)
    return out, dropped


def call_histogram(samples: list[dict]) -> dict[str, int]:
    counts = Counter(s["code_calls"] for s in samples)
    return {str(k): counts[k] for k in sorted(counts)}
