"""A sample's rollout never depends on its batch-mates.

Every per-sample quantity — the remaining token budget, tool rounds left, self-correction attempts — belongs to
its trajectory, in every backend (scripted, HF; vLLM in test_vllm.py) and every caller (training and validation
rollouts, THOR's step level, benchmark generation). The invariant: a trajectory is token for token the same alone
and in any batch, exactly with the scripted backend and with greedy decoding of the tiny model.
"""

import itertools

import pytest
from doubles import ScriptedBackend

from tirl.config.schema import RolloutConfig, SelfCorrectionConfig, StepLevelConfig
from tirl.data.prompts import PromptEncoder, math_record, task_messages
from tirl.methods.step_level import StepLevel
from tirl.models.load import load_policy, load_tokenizer
from tirl.models.tiny import build_tiny, load_tiny_tokenizer
from tirl.rollout.backend import HFBackend
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import SamplingParams, Trajectory, prompt_budgets
from tirl.tools.sandbox import LocalSandbox

GREEDY = dict(max_new_tokens=64, max_total_tokens=52, max_tool_rounds=2, temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def sandbox():
    with LocalSandbox(workers=2, timeout_s=3.0) as sb:
        yield sb


@pytest.fixture(scope="module")
def warm():
    """The shipped SFT-warmed tiny model: it writes a ```python block, reads the output and answers \\boxed{}."""
    return load_policy("tiny-warm"), load_tokenizer("tiny-warm")


def fingerprint(t: Trajectory) -> tuple:
    """What must not change with the batch (log-probs agree to float32 rounding only, so they are not in it)."""
    return (t.response_ids, t.response_mask, t.stop_reason, t.corrections,
            [(c.code_start, c.output_end, c.passed, c.feedback) for c in t.calls])


def alone_and_in_batches(loop: ToolLoop, prompts: list[list[int]]) -> tuple[list[tuple], list[list[tuple]]]:
    """Each prompt's trajectory alone, and in batches of other compositions: all, reversed, each twice (a group)."""
    alone = [fingerprint(loop.run([p])[0]) for p in prompts]
    n = len(prompts)
    batches = [list(range(n)), list(reversed(range(n))), [i for i in range(n) for _ in range(2)]]
    seen = []
    for order in batches:
        trajs = loop.run([prompts[i] for i in order])
        by_prompt = [[fingerprint(t) for i, t in zip(order, trajs) if i == k] for k in range(n)]
        seen.append(by_prompt)
    return alone, seen


# ------------------------------------------------------------------------------------ scripted backend (exact)
class RecordingBackend(ScriptedBackend):
    """Records the per-prompt budgets of every generate call."""

    def __init__(self, tokenizer, respond):
        super().__init__(tokenizer, respond)
        self.budgets: list[list[int]] = []

    def generate(self, prompts, params, max_new_tokens=None):
        self.budgets.append(prompt_budgets(len(prompts), params, max_new_tokens))
        return super().generate(prompts, params, max_new_tokens)


THINKING = "Let me think about it step by step. " * 15 + "Then I compute it now. "   # 252 tokens
CODE = "```python\nprint(2 + 3)\n```"                          # 12 tokens; its output block is 8 more
LONG_ANSWER = ("Now the output says five, so two plus three is five; that is the sum we need. "
               "So the answer is \\boxed{5}.")                # 42 tokens


def budget_script(context: str) -> str:
    """LONG: 272 tokens in its first round, then a 5-token answer. SHORT: 23 tokens, then a 42-token answer.
    CUT: LONG's first round, then SHORT's 42-token answer (which cannot fit in what is left)."""
    first, second = {"LONG": (THINKING, "\\boxed{5}"), "SHORT": ("Go ", LONG_ANSWER),
                     "CUT": (THINKING, LONG_ANSWER)}[next(k for k in ("LONG", "SHORT", "CUT") if k in context)]
    return second if "```output" in context else first + CODE


def test_scripted_budgets_are_per_trajectory_17_vs_266(tok, sandbox):
    """Issue 15's case: after one tool round LONG has 17 tokens left and SHORT 266. In one batch SHORT used to get
    17 too, was cut at "length" and lost its \\boxed{} answer; now each gets its own budget."""
    cfg = RolloutConfig(max_new_tokens=400, max_total_tokens=289, max_tool_rounds=2)
    prompts = {k: tok.encode(f"q {k}") for k in ("LONG", "SHORT", "CUT")}
    backend = RecordingBackend(tok, budget_script)
    loop = ToolLoop(backend, sandbox, tok, cfg)
    batch = dict(zip(prompts, loop.run(list(prompts.values()))))
    assert backend.budgets == [[289, 289, 289], [17, 266, 17]]   # round 2: what each trajectory has left
    long, short, cut = batch["LONG"], batch["SHORT"], batch["CUT"]
    assert short.stop_reason == "eos" and tok.decode(short.response_ids).endswith(LONG_ANSWER + "<|im_end|>")
    assert len(short.response_ids) == 23 + 42 + 1
    assert long.stop_reason == "eos" and tok.decode(long.response_ids).endswith("\\boxed{5}<|im_end|>")
    # CUT writes exactly its 17 remaining tokens of the answer and stops at the total budget
    assert cut.stop_reason == "length" and len(cut.response_ids) == 289
    assert cut.response_ids[272:] == tok.encode(LONG_ANSWER, add_special_tokens=False)[:17]
    # and each is the same alone and in every order
    for order in itertools.permutations(prompts):
        got = dict(zip(order, loop.run([prompts[k] for k in order])))
        for k in prompts:
            assert fingerprint(got[k]) == fingerprint(batch[k]) == fingerprint(loop.run([prompts[k]])[0]), (order, k)


def rounds_script(context: str) -> str:
    """LOOP writes code forever (ends on the tool-round limit); FAIL's code always fails (self-correction, then the
    error is kept); ONCE runs code once then answers; PLAIN answers at once."""
    outputs = context.count("```output")
    if "LOOP" in context:
        return f"Step {outputs}.\n```python\nprint({outputs})\n```"
    if "FAIL" in context:
        return "\\boxed{0}" if outputs else "Try.\n```python\nprint(undefined)\n```"
    if "ONCE" in context:
        return "\\boxed{4}" if outputs else "```python\nprint(2 + 2)\n```"
    return "\\boxed{1}"


def test_scripted_tool_rounds_and_corrections_are_per_trajectory(tok, sandbox):
    cfg = RolloutConfig(max_new_tokens=64, max_total_tokens=120, max_tool_rounds=2,
                        self_correction=SelfCorrectionConfig(True, backtrack_tokens=2, max_corrections=2))
    names = ["LOOP", "FAIL", "ONCE", "PLAIN"]
    prompts = [tok.encode(f"q {k}") for k in names]
    loop = ToolLoop(ScriptedBackend(tok, rounds_script), sandbox, tok, cfg)
    alone = [loop.run([p])[0] for p in prompts]
    got = {k: (t.stop_reason, t.num_calls, t.failed_calls, t.corrections) for k, t in zip(names, alone)}
    assert got == {"LOOP": ("tool_rounds", 2, 0, 0), "FAIL": ("eos", 1, 1, 2), "ONCE": ("eos", 1, 0, 0),
                   "PLAIN": ("eos", 0, 0, 0)}
    want, seen = [fingerprint(t) for t in alone], alone_and_in_batches(loop, prompts)[1]
    for by_prompt in seen:
        for k, fps in enumerate(by_prompt):
            assert all(fp == want[k] for fp in fps), names[k]


# ------------------------------------------------------------------------------------ HF backend, greedy
def test_hf_rows_stop_at_their_own_budgets():
    model, tok = build_tiny(0)
    prompts = [tok.encode("x"), tok.encode("a longer prompt"), tok.encode("mid one")]
    budgets = [2, 9, 5]
    greedy = SamplingParams(max_new_tokens=99, temperature=0.0, stop_at_code=False)
    backend = HFBackend(model, tok)
    alone = [backend.generate([p], greedy, max_new_tokens=[b])[0] for p, b in zip(prompts, budgets)]
    for g, b in zip(alone, budgets):
        assert len(g.ids) <= b and (g.stop_reason == "eos" or (g.stop_reason == "length" and len(g.ids) == b))
    assert [len(g.ids) for g in alone] == budgets      # the random tiny model writes no end-of-turn this early
    # in one batch, with a repeated prompt (one cache read, two rows) and split over several forward batches
    for order, bs in [([0, 1, 2], 64), ([2, 1, 0, 1], 64), ([1, 0, 2, 0], 3)]:
        gens = HFBackend(model, tok, max_batch_size=bs).generate(
            [prompts[i] for i in order], greedy, max_new_tokens=[budgets[i] for i in order])
        for i, g in zip(order, gens):
            assert (g.ids, g.stop_reason) == (alone[i].ids, alone[i].stop_reason)
            # batched matmuls round differently: log-probs agree to float32 precision, the tokens exactly
            assert g.log_probs == pytest.approx(alone[i].log_probs, abs=1e-5)
    with pytest.raises(ValueError, match="one per prompt"):
        backend.generate(prompts, greedy, max_new_tokens=[3])
    with pytest.raises(ValueError, match="at least 1 token"):
        backend.generate(prompts[:1], greedy, max_new_tokens=[0])


def math_prompts(tok, n: int) -> list[list[int]]:
    from tirl.benchmarks.heldout import heldout_records

    encoder = PromptEncoder(tok)
    return [encoder.ids(r) for r in heldout_records("math", n)]


def test_hf_greedy_tool_rollouts_are_the_same_alone_and_in_any_batch(warm, sandbox):
    """Tool-integrated rollouts of the warm tiny model at a total budget (52) that some of them reach after their
    tool round and some do not: the ones that finish alone must finish in a batch too."""
    model, tok = warm
    prompts = math_prompts(tok, 4)
    loop = ToolLoop(HFBackend(model, tok), sandbox, tok, RolloutConfig(**GREEDY))
    alone, seen = alone_and_in_batches(loop, prompts)
    reasons = [fp[2] for fp in alone]
    assert "eos" in reasons and "length" in reasons                       # budgets differ and bind
    assert all(any(passed for *_, passed, _ in fp[4]) for fp in alone)    # every one ran a tool round
    for by_prompt in seen:
        for k, fps in enumerate(by_prompt):
            assert all(fp == alone[k] for fp in fps), k


def test_step_level_continuations_are_the_same_alone_and_in_any_batch(warm, tok, sandbox):
    """THOR's step level: each failing prefix's continuations, and their budget (the step's cap within what is left
    of the trajectory's total), do not depend on the other prefixes of the step."""
    model, _ = warm
    fail = "<think>\nCompute it.\n</think>\n\n```python\nprint(undefined)\n```"
    pads = ["", "First I read the question. " * 2, "First I read the question. " * 5]
    script = ToolLoop(ScriptedBackend(tok, lambda c: "\\boxed{0}" if "```output" in c else pads[int(c[-1])] + fail),
                      sandbox, tok, RolloutConfig(max_new_tokens=200, max_total_tokens=200, max_tool_rounds=1))
    base = math_prompts(tok, 1)[0]
    trajs = script.run([base + tok.encode(f"{i}", add_special_tokens=False) for i in range(len(pads))])
    assert all(t.failed_calls == 1 for t in trajs)
    cfg = RolloutConfig(**{**GREEDY, "max_total_tokens": 80})
    loop = ToolLoop(HFBackend(model, tok), sandbox, tok, cfg)
    step = StepLevel(StepLevelConfig(enabled=True, suffix_tokens=4, group_size=2, max_new_tokens=48))
    kept = [k for _, k in step.prefixes(trajs)]
    assert max(kept) > cfg.max_total_tokens - 48      # one prefix's budget is its trajectory's remainder, not 48

    def steps(ts):
        samples, _ = step(ts, loop, sandbox, tok)
        return [(s.context, s.response, s.advantage) for s in samples]

    alone = [steps([t]) for t in trajs]
    for k, kk in zip(kept, alone):
        assert all(len(resp) <= min(48, cfg.max_total_tokens - k) for _, resp, _ in kk)
    assert [len(resp) for _, resp, _ in alone[-1]] == [cfg.max_total_tokens - kept[-1]] * 2   # the cap binds
    assert steps(trajs) == [s for a in alone for s in a]
    assert steps(trajs[::-1]) == [s for a in alone[::-1] for s in a]


# ------------------------------------------------------------------------------------ evaluation
def test_eval_generation_and_benchmark_score_do_not_depend_on_the_batch(warm, sandbox, tmp_path):
    import json

    from tirl.benchmarks.generate import EvalGenerator
    from tirl.benchmarks.math_run import evaluate_math
    from tirl.benchmarks.task_config import MathTaskConfig

    model, tok = warm
    gen = EvalGenerator(HFBackend(model, tok), tok, RolloutConfig(**GREEDY), sandbox=sandbox)
    problems = ["What is 2 + 3?", "Compute 56^140 mod 499.", "What is 7 * 8 - 5?"]
    records = [math_record(p) for p in problems]
    assert gen.solve(records, 2) == [s for r in records for s in gen.solve([r], 2)]
    convs = [task_messages(r)[0] for r in records]
    assert gen.chat(convs) == [r for c in convs for r in gen.chat([c])]

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "math500.jsonl").write_text("".join(
        json.dumps({"problem": p, "answer": a, "unique_id": f"u{i}"}) + "\n"
        for i, (p, a) in enumerate(zip(problems, ["5", "410", "51"]))))
    scores = []
    for bs in (1, 3):
        task = MathTaskConfig(bench=["math500"], bench_dir=str(bench), batch_size=bs, n_samples=1)
        results, tables = evaluate_math(task, gen, tmp_path / f"out{bs}", {"model": "tiny-warm"})
        scores.append((results, tables))
    assert scores[0] == scores[1]
