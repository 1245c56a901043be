"""Rewards: boxed extraction, math equivalence (also off the main thread), D-CORE reward, repetition, registry."""

import random
import threading
import time

import pytest

from tirl.rewards import UnknownRewardError, get_reward
from tirl.rewards import math as math_module
from tirl.rewards.math import MathAnswerReward, last_boxed, math_equal
from tirl.rewards.repetition import has_heavy_repetition, repeated_ngram_ratio
from tirl.rewards.toolcall import (
    GoldAnswerError,
    ToolCallExactReward,
    ToolCallReward,
    dcore_reward,
    toolcall_exact,
)
from tirl.tools.calls import format_calls

THINK = "<think>\nI should look at the tools.\n</think>\n\n"
WEATHER = [{"get_weather": {"city": ["Paris", "paris"], "unit": ["celsius", ""]}}]


# ---------------------------------------------------------------- math


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and finally \boxed{4", "3"),  # the last one is unclosed: fall back
        ("no box here", None),
        (r"\boxed{}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        ("0.5", "1/2", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"-\frac{3}{4}", "-0.75", True),
        (r"2\sqrt{2}", r"\sqrt{8}", True),
        ("sqrt(8)", r"2\sqrt{2}", True),
        ("x+1", "1+x", True),
        ("12", "12", True),
        ("x = 3", "3", True),
        ("1,000", "1000", True),
        (r"\$5", "5", True),  # an escaped dollar is a currency sign, not a math delimiter
        (r"$\frac{1}{2}$", "0.5", True),
        ("3", "4", False),
        ("1/3", "0.33", False),
        (r"\pi", "3.14", False),
        (r"2\sqrt{3}", r"\sqrt{8}", False),
        (r"\frac{", "1", False),  # malformed LaTeX is just wrong, never an exception
    ],
)
def test_math_equal(pred, gold, equal):
    assert math_equal(pred, gold) is equal


def test_math_equal_fast_path_skips_math_verify(monkeypatch):
    calls = []
    monkeypatch.setattr(math_module._GRADERS, "grade", lambda *a: calls.append(a) or False)
    assert math_equal("6/4", r"\frac{3}{2}") and not math_equal("7", "-7") and math_equal("0.50", "1/2")
    assert calls == []
    assert not math_equal(r"\sqrt{4}", "2") and calls  # not a plain number: the grader process does it


# Hand-checked: exact forms (integers, fractions) compare exactly; a decimal equals a value when it is a rounding
# of it at its written digits AND within 1e-5 relative. Tiny, huge and negative values alike.
@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        ("0.0000001", "0.0000002", False),      # absolute rounding to 6 places made these equal
        ("0.0000001", "-0.0000001", False),     # opposite signs
        ("-0.0000001", "-0.0000001", True),
        ("0.0000001", "0", False),
        ("1e-7", "2e-7", False),                # math-verify's path: numbers compare relatively there too
        ("0.000000123457", "0.0000001234567", True),   # a correct 6-digit rounding of a tiny value
        ("0.000000123456", "0.0000001234567", False),  # truncated, not rounded
        ("0.333333", "1/3", True),
        ("0.166667", "1/6", True),
        ("-0.166667", r"-\frac{1}{6}", True),
        ("0.166667", "-1/6", False),
        ("0.33", "1/3", False),                 # consistent rounding, but only 2 digits: 1% off
        ("1234567.8", "1234567", False),        # within 1e-6 relative, but not a rounding of 1234567
        ("1234567.0", "1234567", True),
        ("123456789012345678901", "123456789012345678902", False),  # huge integers: exact
        ("123456789012345678901", "123456789012345678901.0", True),
        ("100000000000000000000.4", "100000000000000000000", False),
        ("2", "2.0000001", False),
        ("-3", "3", False),
        ("3/6", "0.5", True),
        ("1/3", "0.3333333333", True),
        (r"\sqrt{2}", "1.41421356", True),      # sympy path, relative: 2e-9
        (r"\sqrt{2}", "1.41", False),
        (r"10^{-7}", r"2 \cdot 10^{-7}", False),
        (r"-10^{-9}", r"10^{-9}", False),
        (r"10^{20}", "100000000000000000000", True),
        (r"10^{20}+1", "100000000000000000000", False),   # exact forms stay exact however large
        (r"10^{10^{10}}", "1", False),          # huge: decided by magnitude at 30 digits, no giant integer
    ],
)
def test_math_equal_numbers_by_relative_precision(pred, gold, equal):
    assert math_equal(pred, gold) is equal
    assert math_equal(gold, pred) is equal    # symmetric


def test_math_equal_works_in_a_thread():
    results = {}

    def check():
        results["right"] = math_equal(r"2\sqrt{2}", r"\sqrt{8}")
        results["wrong"] = math_equal(r"\sqrt{3}", "2")

    worker = threading.Thread(target=check)
    worker.start()
    worker.join(timeout=30)
    assert results == {"right": True, "wrong": False}


HOSTILE = [(r"\{10^{10^{10}}\}", r"\{1\}"), (r"(10^{10^{10}}, 1)", "(1, 1)")]   # math-verify never returns


@pytest.mark.parametrize("pred, gold", HOSTILE)
def test_math_equal_is_bounded_in_a_worker_thread(pred, gold):
    """A runaway sympy call off the main thread used to hold the GIL forever; now it ends at its bound, False,
    while the main thread keeps running, and the next call is graded normally."""
    assert math_equal("x+1", "1+x")                  # a warm grader: the bound is then the grading time alone
    results, ticks = {}, []

    def check():
        start = time.monotonic()
        results["verdict"] = math_equal(pred, gold, timeout_s=2)
        results["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=check)
    worker.start()
    while worker.is_alive() and len(ticks) < 200:      # the main thread is not frozen meanwhile
        ticks.append(time.monotonic())
        time.sleep(0.05)
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert results["verdict"] is False and results["seconds"] < 6
    assert len(ticks) >= 10                           # ~2 s of 50 ms ticks ran while the worker graded
    assert math_equal(r"2\sqrt{2}", r"\sqrt{8}")     # a fresh grader takes over


def test_math_answer_reward():
    reward = MathAnswerReward()
    completions = [
        "<think>\nhalf\n</think>\n\nSo \\boxed{0.5}",
        "\\boxed{3}",
        "no box, answer 1",
        [{"role": "assistant", "content": "\\boxed{2\\sqrt{2}}"}],  # TRL conversational form
    ]
    assert reward(completions, answer=["\\frac{1}{2}", "4", "1", "\\sqrt{8}"], id=[0, 1, 2, 3]) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="one answer per completion"):
        reward(["\\boxed{1}"], answer=[])


# ---------------------------------------------------------------- D-CORE reward


def test_exact_match_with_and_without_think_format():
    assert dcore_reward(THINK + "[get_weather(city='Paris')]", WEATHER) == 4.0
    assert dcore_reward(THINK + "[get_weather(city='paris', unit='celsius')]", WEATHER) == 4.0
    assert dcore_reward("[get_weather(city='Paris')]", WEATHER) == 3.0
    # Reasoning present but not in the exact `<think>\n…\n</think>\n\n` shape: no format point.
    assert dcore_reward("<think>hm</think>[get_weather(city='Paris')]", WEATHER) == 3.0
    # A Hermes block is not BFCL's format (its checker fails it): never credited, as a call or as an abstention.
    hermes = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert dcore_reward(THINK + hermes, WEATHER) == -2.0 and dcore_reward(THINK + hermes, []) == -2.0


def test_partial_worked_example_from_docstring():
    gold = [{"get_weather": {"city": ["Paris"], "unit": ["celsius", ""]}}, {"get_time": {"tz": ["CET"]}}]
    # names J = 1/2; get_weather: param J 1 + 1 right value = 2; get_time: 0 -> S = 2.5, M = 1 + 3 + 2 = 6
    # correctness = -3 + 6 * 2.5 / 6 = -0.5; plus the format point = 0.5
    response = "[get_weather(city='Paris', unit='kelvin')]"
    assert dcore_reward(response, gold) == pytest.approx(-0.5)
    assert dcore_reward(THINK + response, gold) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "gold, response, expected",
    [
        # wrong name: names J 0, no same-name prediction -> S 0 of M 3 -> -3
        ([{"f": {"a": [1]}}], "[g(a=1)]", -3.0),
        # extra param: names J 1; param J {a,z} vs {a} = 1/2, 1 right value -> S 2.5 of 3 -> 2.0
        ([{"f": {"a": [1]}}], "[f(a=1, z=0)]", 2.0),
        # missing required b: names J 1; param J {a} vs {a,b} = 1/2, 1 right value -> S 2.5 of 4 -> 0.75
        ([{"f": {"a": [1], "b": ["x"]}}], "[f(a=1)]", 0.75),
        # an extra call: names J {f,f} vs {f} = 1/2; best f scores 1 + 2 -> S 3.5 of 4 -> 2.25
        ([{"f": {"a": [1], "b": [2]}}], "[f(a=1, b=3), f(a=1, b=2)]", 2.25),
        # wrong values only: names J 1; param J 1, 0 right values -> S 2 of 4 -> 0.0
        ([{"f": {"a": [1], "b": [2]}}], "[f(a=5, b=6)]", 0.0),
    ],
)
def test_partial_scores_by_hand(gold, response, expected):
    assert dcore_reward(response, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    "gold, answer_text, expected",
    [
        ("I cannot help: no tool fits.", "Sorry, none of the functions can do that.", 3.0),
        ([], "Sorry, none of the functions can do that.", 3.0),
        ("", "[]", 3.0),  # an empty call list abstains too
        ([], "[get_weather(city='Paris')]", -3.0),  # a call where none was expected
        ([], "<tool_call>{broken</tool_call>", -3.0),
        ([], "[get_weather(city=", 3.0),  # BFCL cannot decode it: no call, and its checker passes the item
        ([], "get_weather('Paris')", -3.0),  # BFCL decodes these three as calls (positional args dropped) ...
        ([], "f('a'), g('b')", -3.0),
        ([], "f(**{'city': 'Paris'})", -3.0),  # ... this one as f with an argument named None
        ([], "```\n[get_weather(city='Paris')]\n```", -3.0),  # a bare fence is stripped
        ([], "[get_weather(city='Paris')]\nThat is all.", 3.0),  # trailing text: BFCL cannot decode it
        (WEATHER, "The weather in Paris is nice.", -3.0),  # text where a call was expected
        (WEATHER, "[]", -3.0),
        # positional args are dropped, as BFCL drops them: get_weather() -> names J 1, param J 0/1 = 0, right values:
        # city 0 + unit (optional, left out) 1 -> S 2 of M 1 + 3 = 4 -> -3 + 6 * 2 / 4 = 0
        (WEATHER, "[get_weather('Paris')]", 0.0),
        (WEATHER, "```python\n[get_weather(city='Paris')]\n```", -3.0),  # BFCL cannot decode a tagged fence
        (WEATHER, "", -3.0),
    ],
)
def test_mismatch_irrelevance_and_unparsable(gold, answer_text, expected):
    assert dcore_reward(answer_text, gold) == expected
    assert dcore_reward(THINK + answer_text, gold) == expected + 1.0


def test_cut_off_inside_reasoning_scores_worst():
    assert dcore_reward("<think>\nstill thinking about get_weather(city='Paris')", WEATHER) == -3.0


def test_parallel_calls_are_order_insensitive():
    gold = [{"f": {"x": [1]}}, {"f": {"x": [2]}}, {"g": {}}]
    for text in ["[f(x=1), f(x=2), g()]", "[g(), f(x=2), f(x=1)]", "[f(x=2), g(), f(x=1)]"]:
        assert dcore_reward(THINK + text, gold) == 4.0
    # BFCL's parallel checker assigns greedily: gold 0 takes f(x=1) and strands f(x=2), so the item fails although
    # a matching exists the other way. Partial credit: names J 1; gold 0 -> f(x=1) 1 + 1, gold 1 -> f(x=2) 1 + 0
    # -> S 4 of M 5 -> -3 + 6 * 4 / 5 = 1.8
    assert dcore_reward("[f(x=1), f(x=2)]", [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}]) == pytest.approx(1.8)
    assert dcore_reward("[f(x=2), f(x=1)]", [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}]) == 3.0
    assert dcore_reward("[f(x=1), f(x=1), g()]", gold) < 3.0


def test_value_matching_rules():
    assert dcore_reward("[f(v=2)]", [{"f": {"v": [2.0]}}]) == 3.0  # int == float
    assert dcore_reward("[f(v=(1, 2))]", [{"f": {"v": [[1, 2]]}}]) == 3.0  # tuple == JSON list
    assert dcore_reward("[f(v=1)]", [{"f": {"v": [True]}}]) < 3.0  # True is not 1
    nested = [{"f": {"loc": [{"city": ["Paris"], "zip": ["", "75001"]}]}}]  # BFCL nested possible answer
    assert dcore_reward("[f(loc={'city': 'Paris'})]", nested) == 3.0
    assert dcore_reward("[f(loc={'city': 'Paris', 'zip': '75001'})]", nested) == 3.0
    assert dcore_reward("[f(loc={'city': 'Paris', 'zip': '1'})]", nested) < 3.0
    assert dcore_reward('[f(a=1)]', '[{"f": {"a": [1]}}]') == 3.0  # gold stored as a JSON string


def test_bad_gold_is_a_clear_error():
    with pytest.raises(GoldAnswerError, match="list of allowed values"):
        dcore_reward("[f(a=1)]", [{"f": {"a": 1}}])
    with pytest.raises(GoldAnswerError, match="must be a BFCL possible-answer list"):
        dcore_reward("[f(a=1)]", {"f": {"a": [1]}})
    for unreadable in ["get_weather('Paris')", "[get_weather(city='Paris')", "f(a=1), g(2)"]:
        with pytest.raises(GoldAnswerError, match="looks like calls but is not readable"):
            dcore_reward("[f(a=1)]", unreadable)
    with pytest.raises(GoldAnswerError, match="expects no call"):
        dcore_reward("I cannot.", WEATHER, category="irrelevance")
    with pytest.raises(GoldAnswerError, match="passes with any call"):
        dcore_reward("[f(a=1)]", WEATHER, category="live_relevance")


@pytest.mark.parametrize("gold", [
    [{"get_weather": {"city": ["Paris"]}}],
    '[{"get_weather": {"city": ["Paris"]}}]',
    '[get_weather(city="Paris")]',                  # a Python call-list string: once read as "no call expected"
    'get_weather(city="Paris")',
    '```python\n[get_weather(city="Paris")]\n```',
    [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
])
def test_every_gold_form_is_understood(gold):
    assert dcore_reward(THINK + "[get_weather(city='Paris')]", gold) == 4.0
    assert dcore_reward(THINK + "[get_weather(city='Rome')]", gold) < 4.0
    assert dcore_reward(THINK + "No function fits.", gold) == -2.0   # not an irrelevance item


def test_irrelevance_follows_the_checker():
    # The issue's inputs: each was +3 and toolcall_exact=True on an irrelevance prompt; BFCL decodes each as a call.
    for text in ['get_weather("Paris")', 'f("a"), g("b")', 'f(**{"city": "Paris"})']:
        for category in (None, "irrelevance", "live_irrelevance"):
            assert dcore_reward(THINK + text, [], category=category) == -2.0
            assert not toolcall_exact(THINK + text, [], category=category)
    assert toolcall_exact(THINK + "None of the functions can do that.", [], category="irrelevance")
    # live_relevance: BFCL has no possible answer; any decoded call passes, prose does not.
    assert toolcall_exact(THINK + "[anything(x=1)]", [], category="live_relevance")
    assert dcore_reward(THINK + "Sorry, I cannot.", [], category="live_relevance") == -2.0
    # nothing after the reasoning is never right (stricter than BFCL, which decodes "" as no call)
    assert dcore_reward("<think>\nhmm", [], category="irrelevance") == -3.0


def test_docs_decide_types_and_required_parameters():
    def doc(**types):
        return [{"name": "f", "parameters": {"type": "dict", "required": list(types),
                                             "properties": {k: {"type": v} for k, v in types.items()}}}]
    assert toolcall_exact("[f(n=2)]", [{"f": {"n": [2.0]}}], doc(n="float"))           # an int passes for a float
    assert not toolcall_exact("[f(n=2.0)]", [{"f": {"n": [2]}}], doc(n="integer"))     # a float is not an integer
    assert toolcall_exact("[f(n=2)]", [{"f": {"n": [2.0]}}], doc(n="number"))          # JSON-schema number = float
    assert not toolcall_exact("[f(b=1)]", [{"f": {"b": [True]}}], doc(b="boolean"))    # 1 is not True
    assert toolcall_exact("[f(s='New-York')]", [{"f": {"s": ["new york"]}}], doc(s="string"))  # BFCL standardises
    assert not toolcall_exact("[f(v=(1, 2))]", [{"f": {"v": [[1, 2]]}}], doc(v="array"))  # a tuple is no array...
    assert toolcall_exact("[f(v=(1, 2))]", [{"f": {"v": [[1, 2]]}}], doc(v="tuple"))      # ... but is a tuple
    # the doc requires b although the possible answer marks it optional: BFCL fails the call without it
    gold = [{"f": {"a": [1], "b": ["", 2]}}]
    assert toolcall_exact("[f(a=1)]", gold) and not toolcall_exact("[f(a=1)]", gold, doc(a="integer", b="integer"))
    # a parameter the doc does not offer fails even when the gold lists it
    assert not toolcall_exact("[f(a=1, z=2)]", [{"f": {"a": [1], "z": [2]}}], doc(a="integer"))
    # the reward callables read the tools and category columns
    exact = ToolCallExactReward()(["[f(n=2.0)]"] * 2, answer=[[{"f": {"n": [2]}}]] * 2,
                                  tools=[doc(n="float"), doc(n="integer")], category=["simple", "simple"])
    assert exact == [1.0, 0.0]
    with pytest.raises(ValueError, match="1 'tools' values"):
        ToolCallReward()(["[f(n=2)]"] * 2, answer=[[]] * 2, tools=[None])


def test_reward_stays_in_range_on_garbage_and_random_calls():
    rng = random.Random(0)
    alphabet = "[](){}=,.'\"abfgx0123-_ \n<>/:thinkool_c"
    names = ["f", "g", "h"]
    for _ in range(300):
        garbage = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        calls = [
            {"name": rng.choice(names), "arguments": {a: rng.randint(0, 2) for a in rng.sample("abc", rng.randint(0, 3))}}
            for _ in range(rng.randint(1, 3))
        ]
        gold = [{c["name"]: {a: [rng.randint(0, 2), ""][: rng.randint(1, 2)] for a in "ab"}} for c in calls[: rng.randint(1, 3)]]
        for response in [garbage, THINK + garbage, THINK + format_calls(calls), format_calls(calls)]:
            for answer in [gold, [], "no call"]:
                assert -3.0 <= dcore_reward(response, answer) <= 4.0


def test_toolcall_exact_and_reward_callables():
    assert toolcall_exact(THINK + "[get_weather(city='Paris')]", WEATHER)
    assert toolcall_exact("I cannot do that.", "irrelevant")
    assert not toolcall_exact("[get_weather(city='Rome')]", WEATHER)
    completions = [THINK + "[get_weather(city='Paris')]", "no call", [{"role": "assistant", "content": "[]"}]]
    answers = [WEATHER, WEATHER, []]
    assert ToolCallReward()(completions, answer=answers) == [4.0, -3.0, 3.0]
    assert ToolCallExactReward()(completions, answer=answers) == [1.0, 0.0, 1.0]


def test_registry():
    assert isinstance(get_reward("math"), MathAnswerReward)
    assert isinstance(get_reward("toolcall"), ToolCallReward)
    assert isinstance(get_reward("toolcall_exact"), ToolCallExactReward)
    with pytest.raises(UnknownRewardError, match=r"choose one of \['math', 'toolcall', 'toolcall_exact'\]"):
        get_reward("dcore")


# ---------------------------------------------------------------- repetition


def test_repeated_ngram_ratio_by_hand():
    # 9 tokens -> 7 trigrams, 3 distinct (abc, bca, cab) -> 1 - 3/7
    assert repeated_ngram_ratio("a b c a b c a b c", n=3) == pytest.approx(4 / 7)
    assert repeated_ngram_ratio("a b c d e", n=3) == 0.0
    assert repeated_ngram_ratio("too short", n=20) == 0.0
    with pytest.raises(ValueError, match="at least 1"):
        repeated_ngram_ratio("x", n=0)


def test_heavy_repetition():
    prose = (
        "We want the number of positive divisors of 360. Factor it first: 360 = 2^3 * 3^2 * 5. "
        "Each divisor picks an exponent for every prime independently, so there are (3+1)(2+1)(1+1) choices. "
        "That product is 4 * 3 * 2 = 24. As a check, the divisors pair up as d and 360/d, and since 360 is "
        "not a perfect square every pair has two distinct members, giving an even count, which 24 is."
    )
    assert not has_heavy_repetition(prose)
    loop = prose + " Wait, let me recompute the product of the exponents plus one once more." * 12
    assert has_heavy_repetition(loop)
    # boundary: the ratio must exceed max_ratio, not equal it
    assert not has_heavy_repetition("a b c a b c a b c", n=3, max_ratio=4 / 7)
    assert has_heavy_repetition("a b c a b c a b c", n=3, max_ratio=0.5)
