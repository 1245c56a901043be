"""D-CORE distillation and TIRGen: pipeline logic on scripted models with known right outputs, resume after a
crash, and both pipelines end to end with the tiny model in-process."""

from __future__ import annotations

import json

import pytest
import torch
from doubles import ScriptedChatBackend
from hydra import compose, initialize_config_dir

from tirl.config import CONFIG_DIR
from tirl.pipelines.chat_backends import ChatParams
from tirl.pipelines.distill import Distiller, DistillSettings, parse_decomposition
from tirl.pipelines.jobs import run_distill, run_tirgen
from tirl.pipelines.runner import progress_path, run_items
from tirl.pipelines.tirgen import TIRGenerator, TIRGenSettings, filter_reason, is_thin, select_samples
from tirl.tools.sandbox import LocalSandbox

torch.set_num_threads(1)

TOOLS = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}},
         {"name": "get_time", "parameters": {"city": {"type": "string"}}}]
GOLD = [{"get_weather": {"city": ["Paris"]}}, {"get_time": {"city": ["Rome"]}}]


def record(rid: str = "r0", gold=GOLD) -> dict:
    return {"id": rid, "messages": [{"role": "system", "content": "Functions: ..."},
                                    {"role": "user", "content": "Weather in Paris and time in Rome?"}],
            "tools": TOOLS, "answer": gold}


def decomposer(text: str) -> ScriptedChatBackend:
    return ScriptedChatBackend(lambda messages, params: text)


GOOD_PLAN = '<think>\nok\n</think>\n\n[{"task": "weather in Paris", "calls": [0]}, {"task": "time in Rome", "calls": [1]}]'
POLICY_REPLIES = {"Sub-task 1: weather in Paris": "<think>\nNeed weather for Paris.\n</think>\n\n[get_weather(city='Paris')]",
                  "Sub-task 2: time in Rome": "<think>\nNeed time for Rome.\n</think>\n\n[get_time(city='Rome')]"}


def policy(replies=POLICY_REPLIES, crash_on: str | None = None) -> ScriptedChatBackend:
    def respond(messages, params):
        last = [m for m in messages if m["role"] == "user"][-1]["content"]
        if crash_on and crash_on in messages[1]["content"]:
            raise Crash()
        return replies.get(last, "<think>\nhm\n</think>\n\n[get_weather(city='Paris')]")
    return ScriptedChatBackend(respond)


class Crash(BaseException):
    """A simulated kill: not an Exception, so the runner does not count it as an item error."""


def settings(composition: str = "auto") -> DistillSettings:
    return DistillSettings(ChatParams(temperature=0), ChatParams(temperature=0), composition)


def test_distill_composes_the_known_parallel_trajectory():
    result = Distiller(decomposer(GOOD_PLAN), policy(), settings())(record())
    assert result.status == "kept"
    (sample,) = result.samples
    assert sample["loss_on"] == "last_assistant" and sample["tools"] == TOOLS
    assert sample["messages"][:2] == record()["messages"]
    assert sample["messages"][2] == {"role": "assistant", "content": (
        "<think>\nThe request has 2 sub-tasks.\n1. weather in Paris\n2. time in Rome\n"
        "Sub-task 1: Need weather for Paris.\nSub-task 2: Need time for Rome.\n</think>\n\n"
        "[get_weather(city='Paris'), get_time(city='Rome')]")}


def test_distill_sequential_gives_one_sample_per_step_with_gold_results_fed_back():
    conv = {"id": "mt", "tools": TOOLS, "conversations": [
        {"from": "human", "value": "Weather in Paris and time in Rome?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "sunny"},
        {"from": "function_call", "value": '{"name": "get_time", "arguments": {"city": "Rome"}}'},
        {"from": "observation", "value": "10:00"},
        {"from": "gpt", "value": "Sunny; 10:00."}]}
    seen = []
    pol = policy()
    orig = pol.respond
    pol.respond = lambda m, p: seen.append(m) or orig(m, p)
    result = Distiller(decomposer(GOOD_PLAN), pol, settings())(conv)
    assert result.status == "kept" and len(result.samples) == 2
    first, second = (s["messages"] for s in result.samples)
    assert first[-1]["content"].startswith("<think>\nThe request has 2 sub-tasks.") and first[-1]["content"].endswith(
        "[get_weather(city='Paris')]")
    assert second[len(first) - 1] == first[-1] and second[len(first)] == {"role": "tool", "content": "sunny"}
    assert second[-1]["content"] == "<think>\nSub-task 2: Need time for Rome.\n</think>\n\n[get_time(city='Rome')]"
    assert {"role": "tool", "content": "sunny"} in seen[1]  # the policy saw the gold result before step 2


@pytest.mark.parametrize("plan, reason", [
    ("no json here", "decompose_no_json"),
    ("[{'task': 'x', 'calls': [0]}]", "decompose_bad_json"),
    ('[{"task": "x", "calls": ["0"]}]', "decompose_bad_schema"),
    ('[{"task": "x", "calls": [0]}]', "decompose_bad_coverage"),
    ('[{"task": "x", "calls": [0, 1]}, {"task": "y", "calls": [1]}]', "decompose_bad_coverage"),
])
def test_decomposer_junk_is_a_counted_drop_reason(plan, reason):
    assert parse_decomposition(plan, 2) == reason
    assert Distiller(decomposer(plan), policy(), settings())(record()).reason == reason


def test_distill_drops_wrong_calls_and_keeps_irrelevance_with_the_fixed_template():
    wrong = dict(POLICY_REPLIES, **{"Sub-task 2: time in Rome": "<think>\nx\n</think>\n\n[get_time(city='Oslo')]"})
    assert Distiller(decomposer(GOOD_PLAN), policy(wrong), settings())(record()).reason == "calls_not_gold"
    junk = dict(POLICY_REPLIES, **{"Sub-task 2: time in Rome": "<think>\nx\n</think>\n\n[get_time('Rome')]"})
    assert Distiller(decomposer(GOOD_PLAN), policy(junk), settings())(record()).reason == "policy_unparsable_calls"
    asked = decomposer(GOOD_PLAN)
    result = Distiller(asked, policy(), settings())(record("irr", gold=[]))
    assert result.status == "kept" and asked.stats.requests == 0
    assert result.samples[0]["messages"][-1]["content"].endswith("None of the given functions can help with this request as asked.")


def _distill_cfg(out, n_items: int = 6, concurrency: int = 1):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("distill", overrides=[f"output={out}", f"max_concurrency={concurrency}",
                                             f"input.synthetic.n={n_items}", "input.synthetic.seed=3"])


def _gold_policy_for(records):
    """A scripted decomposer/policy pair that solves the synthetic records (one sub-task per gold call)."""
    from tirl.tools.calls import format_calls

    def plan(messages, params):
        n = messages[-1]["content"].count("\n") - 1  # "Request…\nReference calls:" then one call a line
        return json.dumps([{"task": f"step {i}", "calls": [i]} for i in range(n)])

    by_query = {r["messages"][-1]["content"]: r["answer"] for r in records}

    def act(messages, params):
        gold = by_query[messages[1]["content"]]
        k = int(messages[-1]["content"].split(":")[0].split()[-1]) - 1
        (name, args), = gold[k].items()
        return f"<think>\ncall {name}\n</think>\n\n" + format_calls([{"name": name, "arguments": {a: v[0] for a, v in args.items() if v[0] != ""}}])
    return plan, act


def test_killed_and_resumed_distill_writes_the_same_file(tmp_path):
    from tirl.pipelines.jobs import load_inputs

    cfg_full = _distill_cfg(tmp_path / "full.jsonl")
    records = load_inputs(cfg_full)
    plan, act = _gold_policy_for(records)
    backends = lambda: {"decomposer": ScriptedChatBackend(plan), "policy": ScriptedChatBackend(act)}  # noqa: E731
    full = run_distill(cfg_full, backends(), show_progress=False)
    assert full["kept"] >= 4 and full["items"] == 6

    cfg = _distill_cfg(tmp_path / "resumed.jsonl", concurrency=2)
    calls = {"n": 0}
    crash_backends = backends()

    def crashing(messages, params):
        calls["n"] += 1
        if calls["n"] > 4:
            raise Crash()
        return act(messages, params)
    crash_backends["policy"] = ScriptedChatBackend(crashing)
    with pytest.raises(Crash):
        run_distill(cfg, crash_backends, show_progress=False)
    assert not (tmp_path / "resumed.jsonl").exists()  # nothing final is written before every item is done
    finished_before = len(progress_path(tmp_path / "resumed.jsonl").read_text().splitlines())
    assert 0 < finished_before < 6
    again = backends()
    resumed = run_distill(cfg, again, show_progress=False)
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert {k: resumed[k] for k in ("kept", "dropped", "drop_reasons")} == {k: full[k] for k in ("kept", "dropped", "drop_reasons")}
    # the rerun asked the decomposer only about items that had not finished
    assert again["decomposer"].stats.requests <= 6 - finished_before


def test_runner_counts_errors_and_retries_them_on_rerun(tmp_path):
    out = tmp_path / "o.jsonl"
    state = {"fail": True}

    def job(rec):
        from tirl.pipelines.runner import ItemResult
        if rec["id"] == "b" and state["fail"]:
            raise RuntimeError("boom")
        return ItemResult("kept", samples=[{"x": rec["id"]}])
    first = run_items([{"id": "a"}, {"id": "b"}], job, out, show_progress=False)
    assert [r["status"] for r in first] == ["kept", "error"] and first[1]["reason"] == "exception:RuntimeError"
    state["fail"] = False
    second = run_items([{"id": "a"}, {"id": "b"}], job, out, show_progress=False)
    assert [r["status"] for r in second] == ["kept", "kept"]


# ---------------------------------------------------------------- TIRGen


@pytest.fixture(scope="module")
def sandbox():
    box = LocalSandbox(workers=1, timeout_s=5)
    yield box
    box.close()


def math_record(rid="m0", answer="84") -> dict:
    return {"id": rid, "messages": [{"role": "system", "content": "Use python."},
                                    {"role": "user", "content": "PROBLEM: what is 12 times 7?"}], "answer": answer}


def tir_settings(**kw) -> TIRGenSettings:
    return TIRGenSettings(ChatParams(temperature=0), ChatParams(temperature=0), max_steps=4, **kw)


def test_tirgen_real_output_replaces_the_predicted_one(sandbox):
    def act(messages, params):
        prefix = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        if not prefix:
            return "First compute 12*7.\n```output\n85\n```\n\nmore text that the stop cuts"
        assert "```output\n84\n```" in prefix and "85" not in prefix  # the actor continues from the rewritten step
        return "So the answer is \\boxed{84}."
    critic_saw = []

    def critique(messages, params):
        critic_saw.append(json.dumps(messages))
        return "```python\nimport math\nprint(math.prod([12, 7]))\n```"
    gen = TIRGenerator(ScriptedChatBackend(act), ScriptedChatBackend(critique), sandbox, tir_settings())
    result = gen(math_record())
    assert result.status == "kept", result.reason
    assert result.samples[0]["messages"][-1]["content"] == (
        "First compute 12*7.\n```python\nimport math\nprint(math.prod([12, 7]))\n```\n```output\n84\n```\n\n"
        "So the answer is \\boxed{84}.")
    assert len(critic_saw) == 1 and "PROBLEM" not in critic_saw[0] and "84" not in critic_saw[0]


def test_tirgen_drops_failed_calls_and_wrong_answers(sandbox):
    def act(messages, params):
        return "Compute.\n" if messages[-1]["role"] != "assistant" else "\\boxed{84}"
    broken = TIRGenerator(ScriptedChatBackend(act), ScriptedChatBackend(lambda m, p: "```python\nimport math\nprint(1/0)\n```"),
                          sandbox, tir_settings())
    assert broken(math_record()).reason == "failed_call"
    assert broken(math_record(answer="85")).reason == "wrong_answer"
    no_code = TIRGenerator(ScriptedChatBackend(act), ScriptedChatBackend(lambda m, p: "NO"), sandbox, tir_settings())
    assert no_code(math_record()).reason == "no_code"


def test_tirgen_records_who_wrote_what_so_printed_structure_is_not_the_models(sandbox):
    """The sandbox prints a fenced block, an end-of-turn, a think tag and a boxed number: the sample's SFT loss
    skips all of it (the old pattern stopped the output at the printed fence and trained on `DONE ...`), and the
    format filter reads the model's text, so a printed lone fence or `{` does not drop a good sample."""
    from tirl.data.chat_template import encode_conversation
    from tirl.models.tiny import load_tiny_tokenizer

    printed = "Result:\n```\nx = 4\n```\nDONE <|im_end|> </think> \\boxed{9} ``` {"

    def act(messages, params):
        return "Compute 12*7.\n" if messages[-1]["role"] != "assistant" else "So the answer is \\boxed{84}."

    # the code builds the text (its own source holds no fence, brace, tag or boxed)
    built = " + ".join(f"chr({ord(c)})" if c in "`{}<>\\" else repr(c) for c in printed)
    code = f"import math\nprint(math.prod([12, 7]))\nprint({built})"
    gen = TIRGenerator(ScriptedChatBackend(act), ScriptedChatBackend(lambda m, p: f"```python\n{code}\n```"),
                       sandbox, tir_settings())
    result = gen(math_record())
    assert result.status == "kept", result.reason
    turn = result.samples[0]["messages"][-1]
    (start, end), = turn["env_spans"]
    assert turn["content"][start:end] == f"```output\n84\n{printed}\n```"
    tok = load_tiny_tokenizer()
    messages = result.samples[0]["messages"]
    (seq,) = encode_conversation(tok, messages, loss_on="last_assistant")
    ids, mask = seq.input_ids, seq.loss_mask
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    # the model's text as the template writes the last turn (Qwen3 adds an empty think block), none of the output
    assert trained == "<think>\n\n</think>\n\n" + turn["content"][:start] + turn["content"][end:] + "<|im_end|>"
    assert "DONE" not in trained and ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == len(messages)
    # the answer filter reads the model's \boxed{}, not one the code printed
    wrong = TIRGenerator(ScriptedChatBackend(lambda m, p: "Compute 12*7.\n" if m[-1]["role"] != "assistant"
                                             else "So the answer is \\boxed{85}."),
                         ScriptedChatBackend(lambda m, p: f"```python\n{code}\n```"), sandbox, tir_settings())
    assert wrong(math_record(answer="9")).reason == "wrong_answer"


def test_tirgen_filters_on_known_texts():
    from tirl.pipelines.tirgen import CodeCall, rewrite_step
    s = tir_settings()
    body = "Let me compute the gcd of the two numbers carefully.\n"

    def sample(codes: list[str], tail: str = "\\boxed{2}", outputs: list[str] | None = None):
        """(text, calls) as TIRGenerator builds them: one rewritten step per code, spans recorded."""
        text, calls = body, []
        for k, code in enumerate(codes):
            out = (outputs or ["2"] * len(codes))[k]
            step = rewrite_step("Step.", code, out)
            block = f"```output\n{out}\n```"
            calls.append(CodeCall(code, True, out, (len(text) + len(step) - len(block), len(text) + len(step))))
            text += step + "\n\n"
        return text + tail, calls

    lib, thin = "import math\nprint(math.gcd(4, 6))", "print(2 + 3)"
    text, calls = sample([lib])
    assert filter_reason(text, "2", calls, s) is None
    text, calls = sample([lib, thin])
    assert filter_reason(text, "2", calls, s) == "trivial_code"                             # 50% thin > 40%
    text, calls = sample([lib, lib, thin])
    assert filter_reason(text, "2", calls, s) is None                                       # 33% thin is allowed
    assert is_thin("print(2 + 3)") and not is_thin("for i in range(3):\n    print(i)") and not is_thin("import sympy")
    assert filter_reason("\\boxed{2}", "2", [], s) == "no_code"
    assert filter_reason("\\boxed{2}", "2", [CodeCall(lib, True, "2")], s) == "too_short"
    text, calls = sample([lib], "```python\nx\n\\boxed{2}")                                # a block never run
    assert filter_reason(text, "2", calls, s) == "unbalanced_format"
    text, calls = sample([lib], " ".join(["a b c d e f g h i j k"] * 40) + "\\boxed{2}")
    assert filter_reason(text, "2", calls, s) == "repetition"
    # what the sandbox printed is not the model's: fences, braces, tags, repetition or a boxed number there
    printed = "```\n{ </think> \\boxed{7} " + " ".join(["a b c d e f g h i j k"] * 40)
    text, calls = sample([lib], outputs=[printed])
    assert filter_reason(text, "2", calls, s) is None
    assert filter_reason(text[:calls[0].span[1]] + "\n\nno answer", "7", calls, s) == "no_answer"


def test_selection_keeps_one_per_problem_and_downsamples_one_call():
    fin = [{"id": f"i{k}", "samples": [{"problem": p, "code_calls": c}]}
           for k, (p, c) in enumerate([("p", 2), ("p", 3), ("q", 1), ("r", 1), ("s", 1), ("t", 2)])]
    kept_all, drops = select_samples(fin, 1.0, seed=0)
    assert [s["problem"] for s in kept_all] == ["p", "q", "r", "s", "t"] and drops == {"duplicate_problem": 1}
    none_one, drops = select_samples(fin, 0.0, seed=0)
    assert [s["problem"] for s in none_one] == ["p", "t"] and drops["one_call_downsampled"] == 3


# ---------------------------------------------------------------- end to end, tiny model in-process


def test_both_pipelines_end_to_end_with_the_tiny_model(tmp_path):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        dcfg = compose("distill", overrides=[f"output={tmp_path}/d.jsonl", "input.synthetic.n=4", "max_concurrency=2",
                                             "decomposer_params.max_tokens=24", "policy_params.max_tokens=24"])
        tcfg = compose("tirgen", overrides=[f"output={tmp_path}/t.jsonl", "input.synthetic.n=2", "max_steps=2",
                                            "actor_params.max_tokens=16", "critic_params.max_tokens=16",
                                            "sandbox.workers=1"])
    d = run_distill(dcfg, show_progress=False)
    assert d["items"] == 4 and d["kept"] + d["dropped"] + d["errors"] == 4
    assert sum(d["drop_reasons"].values()) == d["dropped"]
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(lines) == d["samples"] and all(set(s) == {"messages", "tools", "loss_on"} for s in lines)
    assert json.loads((tmp_path / "d.report.json").read_text())["items"] == 4
    t = run_tirgen(tcfg, show_progress=False)
    assert t["items"] == 2 and t["kept"] + t["dropped"] + t["errors"] == 2
    assert sum(t["code_calls_histogram"].values()) == t["samples"] == len((tmp_path / "t.jsonl").read_text().splitlines())
    assert t["backends"]["actor"]["requests"] >= 2
