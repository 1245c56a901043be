"""Synthetic math and tool-call generators: determinism, real sandbox outputs, gold answers, length bounds."""

from __future__ import annotations

import ast
import re

import pytest
import torch

from tirl.data.prompts import MATH_SYSTEM_PROMPT, PromptEncoder, task_messages, toolcall_system_prompt
from tirl.data.record_checks import rl_problem, sft_problem
from tirl.data.synthetic_math import (
    LEVELS,
    in_split,
    make_math_rl_prompts,
    make_math_sft_samples,
    problem_at,
    question_hash,
)
from tirl.data.synthetic_toolcall import (
    CATALOGUE,
    CATEGORIES,
    NO_CALL_ANSWER,
    NO_CALL_THINK,
    make_toolcall_rl_prompts,
    make_toolcall_sft_samples,
    target_text,
    task_at,
)
from tirl.models.tiny import load_tiny_tokenizer
from tirl.rewards.toolcall import parse_gold, toolcall_exact
from tirl.tools.calls import parse_calls
from tirl.tools.sandbox import LocalSandbox
from tirl.tools.text_format import split_reasoning

torch.set_num_threads(1)
SOLUTION = re.compile(r"^<think>\n[^\n]+\n</think>\n\n```python\n(.+?)\n```\n```output\n(.*?)\n```\n\\boxed\{(.+)\}$", re.S)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def sandbox():
    with LocalSandbox(workers=2) as sb:
        yield sb


@pytest.fixture(scope="module")
def math_samples(sandbox):
    return {level: make_math_sft_samples(60, seed=3, levels=[level], sandbox=sandbox) for level in LEVELS}


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------- math


def test_math_stream_is_a_pure_function_of_seed_and_index():
    a = make_math_rl_prompts(30, seed=7)
    assert a == make_math_rl_prompts(30, seed=7)
    assert make_math_rl_prompts(10, seed=7, start=20) == a[20:]  # resumable anywhere
    b = make_math_rl_prompts(30, seed=8)
    assert sum(x["answer"] != y["answer"] for x, y in zip(a, b, strict=True)) > 20
    assert all(rl_problem(r) is None and r["task"] == "math" for r in a)


def test_levels_are_respected_and_graded():
    for level in LEVELS:
        problems = [problem_at(0, i, [level]) for i in range(40)]
        assert {p.level for p in problems} == {level}
    # level 1 is one operation, level 2 two, level 3 three
    assert all(p.code.count("*") + p.code.count("+") == 1 for p in (problem_at(0, i, [1]) for i in range(40)))
    assert all(re.fullmatch(r"print\(\d+ \* \d+ [+-] \d+\)", problem_at(0, i, [2]).code) for i in range(40))
    assert all(len(re.findall(r" [*+-] ", problem_at(0, i, [3]).code)) == 3 for i in range(40))
    with pytest.raises(ValueError, match="levels"):
        problem_at(0, 0, [5])


def test_heldout_never_equals_train():
    train = {question_hash(r["messages"][0]["content"]) for s in (0, 1) for r in make_math_rl_prompts(400, seed=s)}
    held = make_math_rl_prompts(100, seed=0, split="heldout") + make_math_rl_prompts(100, seed=9, split="heldout")
    held_hashes = {question_hash(r["messages"][0]["content"]) for r in held}
    assert not train & held_hashes
    assert all(in_split(r["messages"][0]["content"], "heldout") for r in held)
    # a held-out set has no duplicates
    assert len({question_hash(r["messages"][0]["content"]) for r in held[:100]}) == 100


def test_sft_outputs_are_real_sandbox_runs_and_gold_is_boxed(math_samples, sandbox):
    samples = [s for level in LEVELS for s in math_samples[level]]
    parsed = [SOLUTION.match(s["messages"][-1]["content"]) for s in samples]
    assert all(parsed), "every solution follows the think / python / output / boxed template"
    rerun = sandbox.run_batch([m.group(1) for m in parsed])
    for m, result in zip(parsed, rerun, strict=True):
        code, output, boxed = m.groups()
        assert result.ok and result.stdout.strip() == output  # the output block is what the code prints
        assert boxed == output
        assert ast.parse(code)  # plain, parseable Python
    # gold of the matching RL prompt = the boxed value
    rl = make_math_rl_prompts(60, seed=3, levels=[4])
    sft4 = math_samples[4]
    by_question = {r["messages"][0]["content"]: r["answer"] for r in rl}
    matched = [s for s in sft4 if s["messages"][0]["content"] in by_question]
    assert len(matched) >= 50
    for s in matched:
        assert SOLUTION.match(s["messages"][-1]["content"]).group(3) == by_question[s["messages"][0]["content"]]
    assert all(sft_problem(s) is None for s in samples)


def test_hand_checked_level4_answer():
    # pin one problem of each loop/library kind by recomputing it from its own numbers
    checked = {"gcd": 0, "sum": 0, "mod": 0, "multiples": 0}
    for i in range(200):
        p = problem_at(0, i, [4])
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        if "gcd" in p.question:
            a, b = nums
            while b:
                a, b = b, a % b
            assert p.answer == str(a)
            checked["gcd"] += 1
        elif "sum of the integers" in p.question:
            lo, hi = nums
            assert p.answer == str((lo + hi) * (hi - lo + 1) // 2)
            checked["sum"] += 1
        elif "mod" in p.question:
            a, b, m = nums
            assert p.answer == str(pow(a, b, m))
            checked["mod"] += 1
        elif "multiples" in p.question:
            _, n, k = nums
            assert p.answer == str(n // k)
            checked["multiples"] += 1
    assert min(checked.values()) >= 10, checked


def test_sandbox_disagreement_is_refused():
    class LyingSandbox:
        def run_batch(self, codes):
            from tirl.tools.sandbox import ExecResult

            return [ExecResult(ok=True, stdout="0\n", stderr="", error=None, duration_s=0.0) for _ in codes]

    with pytest.raises(RuntimeError, match="sandbox printed"):
        make_math_sft_samples(3, seed=0, levels=[1], sandbox=LyingSandbox())
    with pytest.raises(ValueError, match="sandbox"):
        make_math_sft_samples(3, seed=0, levels=[1], sandbox=None)


def test_math_lengths_fit_the_tiny_model(tok, math_samples):
    assert n_tokens(tok, MATH_SYSTEM_PROMPT) <= 16
    for level in LEVELS:
        for s in math_samples[level]:
            content = n_tokens(tok, MATH_SYSTEM_PROMPT) + n_tokens(tok, s["messages"][0]["content"])
            rendered = PromptEncoder(tok).length({**s, "messages": s["messages"][:-1]})
            response = n_tokens(tok, s["messages"][-1]["content"])
            assert content <= 60, s["messages"][0]["content"]
            assert rendered <= 80, s["messages"][0]["content"]
            assert response <= 64, s["messages"][-1]["content"]


# ---------------------------------------------------------------- tool calls


def test_catalogue_schemas():
    assert len(CATALOGUE) >= 20 and len({f.name for f in CATALOGUE}) == len(CATALOGUE)
    types = set()
    for f in CATALOGUE:
        tool = f.tool()
        props, required = tool["parameters"]["properties"], tool["parameters"]["required"]
        assert tool["parameters"]["type"] == "object" and set(required) <= set(props)
        types |= {p["type"] for p in props.values()} | {"enum" for p in props.values() if "enum" in p}
    assert types == {"string", "integer", "number", "boolean", "enum"}
    assert any(len(f.tool()["parameters"]["required"]) < len(f.params) for f in CATALOGUE)  # optionals exist


@pytest.mark.parametrize("category", CATEGORIES)
def test_toolcall_categories_gold_and_targets(category):
    rl = make_toolcall_rl_prompts(40, seed=1, categories=[category])
    sft = make_toolcall_sft_samples(40, seed=1, categories=[category])
    for r in rl:
        assert rl_problem(r) is None and r["category"] == category
        offered = [t["name"] for t in r["tools"]]
        gold = parse_gold(r["answer"])
        names = [g.name for g in gold]
        assert r["messages"] == [{"role": "user", "content": r["messages"][-1]["content"]}]   # the task adds the tools
        assert task_messages(r)[0][0]["content"] == toolcall_system_prompt(r["tools"])
        if category == "simple":
            assert len(offered) == 1 and names == offered
        elif category == "multiple":
            assert len(offered) >= 2 and len(names) == 1 and names[0] in offered
        elif category == "parallel":
            assert len(offered) == 1 and len(names) >= 2 and set(names) == set(offered)
        elif category == "parallel_multiple":
            assert len(names) >= 2 and len(set(names)) >= 2 and set(names) <= set(offered)
        else:
            assert r["answer"] == [] and gold == []
    for s in sft:
        assert sft_problem(s) is None
        reasoning, answer = split_reasoning(s["messages"][-1]["content"])
        assert s["messages"][-1]["content"].startswith("<think>\n")
        if category == "irrelevance":
            assert not answer.startswith("[") and ("no sub-task" in reasoning or ", not given." in reasoning)
            continue
        calls = parse_calls(answer)
        assert isinstance(calls, list)
        ast.parse(answer, mode="eval")  # the call list is Python
        n = len(calls)
        assert reasoning.startswith(f"The request has {n} sub-task{'s' if n > 1 else ''}.")
        assert [line.split(". ")[0] for line in reasoning.splitlines()[1:]] == [str(i) for i in range(1, n + 1)]


def test_sft_target_calls_satisfy_the_rl_gold():
    # the same (seed, index) gives the RL prompt and the SFT sample of one task
    from tirl.data.synthetic_toolcall import target_text, toolcall_rl_prompt

    for i in range(150):
        task = task_at(5, i)
        prompt = toolcall_rl_prompt(task, "x")
        if task.category == "irrelevance":
            assert parse_gold(prompt["answer"]) == []
        # the target earns the reward's (BFCL's) "correct", typed by the JSON-schema docs the prompt offers
        assert toolcall_exact(target_text(task), prompt["answer"], prompt["tools"], prompt["category"]), target_text(task)


def test_hand_written_toolcall_example():
    from tirl.data.synthetic_toolcall import CATALOGUE, Call, ToolTask, render_calls, target_text

    by_name = {f.name: f for f in CATALOGUE}
    weather, email = by_name["get_weather"], by_name["send_email"]
    task = ToolTask("parallel_multiple", "q", (weather, email),
                    (Call(weather, {"city": "Paris"}), Call(email, {"to": "bob", "subject": "lunch"})))
    assert render_calls(task.calls) == '[get_weather(city="Paris"), send_email(to="bob", subject="lunch")]'
    assert target_text(task) == (
        "<think>\nThe request has 2 sub-tasks.\n1. Get the weather in Paris: get_weather.\n"
            "2. Send an email to bob about lunch: send_email.\n"
        '</think>\n\n[get_weather(city="Paris"), send_email(to="bob", subject="lunch")]')
    assert task.calls[0].gold() == {"get_weather": {"city": ["Paris"], "units": ["", "celsius"]}}


def test_toolcall_determinism_and_heldout_disjoint():
    assert make_toolcall_rl_prompts(20, seed=2) == make_toolcall_rl_prompts(20, seed=2)
    assert make_toolcall_rl_prompts(5, seed=2, start=15) == make_toolcall_rl_prompts(20, seed=2)[15:]
    train = {task_at(s, i).key for s in (0, 1) for i in range(500)}
    held = {task_at(0, i, split="heldout").key for i in range(100)}
    assert not train & held


def test_sft_and_rl_halves_partition_the_train_split():
    # a warm start SFT'd on the sft half can be RL'd on prompts it never saw; held-out stays apart from both
    sft = {task_at(0, i, split="sft").key for i in range(400)}
    rl = {task_at(0, i, split="rl").key for i in range(400)}
    held = {task_at(0, i, split="heldout").key for i in range(100)}
    assert sft and rl and not sft & rl and not (sft | rl) & held
    train = [task_at(0, i).key for i in range(2000)]
    in_sft = sum(in_split(k, "sft") for k in train) / len(train)
    assert all(in_split(k, "sft") != in_split(k, "rl") for k in train)   # every train task is in exactly one half
    assert 0.35 < in_sft < 0.65
    questions = [problem_at(3, i, split="rl").question for i in range(50)]
    assert all(in_split(q, "rl") and in_split(q, "train") and not in_split(q, "sft") for q in questions)
    with pytest.raises(ValueError, match="split must be one of"):
        task_at(0, 0, split="test")


def test_toolcall_lengths(tok):
    # a few short functions per prompt keep whole samples under ~640 tokens (set data.max_length >= 640)
    for s in make_toolcall_sft_samples(100, seed=0):
        (seq,) = PromptEncoder(tok).conversation(s)
        assert len(seq.input_ids) <= 640
        assert n_tokens(tok, s["messages"][-1]["content"]) <= 160


def test_toolcall_sft_samples_keep_the_stream_mix():
    # sample i is the task of RL prompt i, so SFT sees the categories in the shares RL and evaluation do
    sft = make_toolcall_sft_samples(600, seed=3)
    rl = make_toolcall_rl_prompts(600, seed=3)
    assert [s["messages"][:-1] for s in sft] == [r["messages"] for r in rl]
    simple = sum(r["category"] == "simple" for r in rl) / len(rl)
    assert 0.15 < simple < 0.25


def test_toolcall_targets_tie_each_sub_task_to_its_function():
    by_kind = {}
    for i in range(400):
        task = task_at(5, i)
        kind = "missing" if task.missing else ("small_talk" if not task.calls else task.category)
        by_kind.setdefault(kind, task)
    parallel = by_kind["parallel_multiple"]
    lines = target_text(parallel).split("\n")
    assert lines[1] == "The request has 2 sub-tasks."
    assert [line.rsplit(": ", 1)[1] for line in lines[2:4]] == [f"{c.fn.name}." for c in parallel.calls]
    missing = by_kind["missing"]
    assert missing.category == "irrelevance" and missing.missing[0].fn not in missing.tools
    assert target_text(missing) == ("<think>\nThe request has 1 sub-task.\n1. "
                                    f"{missing.query[:-1]}: {missing.missing[0].fn.name}, not given.\n</think>\n\n"
                                    f"{NO_CALL_ANSWER}")
    assert target_text(by_kind["small_talk"]) == f"<think>\n{NO_CALL_THINK}\n</think>\n\n{NO_CALL_ANSWER}"
