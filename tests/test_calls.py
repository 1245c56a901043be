"""Tool-call parsing: BFCL python lists and Hermes <tool_call> blocks, hostile input, round trips."""

import random

import pytest

from tirl.tools.calls import (
    ParseError,
    decode_bfcl_calls,
    format_calls,
    parse_calls,
)
from tirl.tools.text_format import split_reasoning


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[f(a=1, b=[1, 2]), mod.g(x=\"s\")]", [call("f", a=1, b=[1, 2]), call("mod.g", x="s")]),
        ("[f(a=-3, b=-2.5)]", [call("f", a=-3, b=-2.5)]),
        ("[f(d={'k': [1, {'n': None}]}, t=(1, 2), yes=True, no=False)]",
         [call("f", d={"k": [1, {"n": None}]}, t=(1, 2), yes=True, no=False)]),
        ("[a.b.c(x=1)]", [call("a.b.c", x=1)]),
        ("f(a=1)", [call("f", a=1)]),  # a bare single call
        ("f(a=1), g(b=2)", [call("f", a=1), call("g", b=2)]),
        ("[f()]", [call("f")]),
        ("[]", []),
        ("  [f(a='x')]\n", [call("f", a="x")]),
        ("```python\n[f(a=1)]\n```", [call("f", a=1)]),
    ],
)
def test_parse_python_calls(text, expected):
    assert parse_calls(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "[__import__('os').system('x')]",  # the called thing is itself a call, not a name
        "[f(a=open('x'))]",  # non-literal value
        "[f(a=x)]",  # a name, not a literal
        "[f(a=1+len('x'))]",
        "[f(1)]",  # positional argument
        "[f(a=1, a=2)]",  # repeated keyword
        "[f(**{'a': 1})]",
        "[f(a=1)",  # syntax error
        "[1, 2]",  # not calls
        "hello world",
        "42",
        "()",
        "[f(a=1)][0]",
        "[(lambda: 1)()]",
        "[f(a=1)]; import os",
        "<tool_call>{\"name\": \"f\", \"arguments\": {}}",  # unclosed
        "<tool_call>{'name': 'f'}</tool_call>",  # not JSON
        "<tool_call>[1, 2]</tool_call>",
        "<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>",
        "[" * 5000,  # deep nesting must not blow the stack
        "",
    ],
)
def test_malformed_text_is_a_falsy_parse_error(text):
    result = parse_calls(text)
    assert isinstance(result, ParseError) and not result and result.reason


def test_parse_never_raises_on_random_garbage():
    rng = random.Random(0)
    alphabet = "[](){}=,.'\"abcf0123-_ <>/:tool_call\n"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        result = parse_calls(text)
        assert isinstance(result, (list, ParseError))


def test_parse_hermes_blocks():
    text = (
        "I will call two tools.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>\n'
        '<tool_call>{"name": "math.add", "arguments": "{\\"a\\": -1}"}</tool_call>'
    )
    assert parse_calls(text) == [call("get_weather", city="Paris", days=[1, 2]), call("math.add", a=-1)]


def test_round_trip_python_form():
    calls = [
        call("f", a=1, b=[1, 2], c={"k": None}),
        call("pkg.mod.g", x="quote's \"both\"", y=-0.25, z=True, t=(1, "a")),
        call("h"),
    ]
    text = format_calls(calls)
    assert text.startswith("[f(a=1, b=[1, 2]") and text.endswith("h()]")
    assert parse_calls(text) == calls
    assert format_calls([]) == "[]" and parse_calls("[]") == []


def test_format_rejects_unrenderable_names():
    with pytest.raises(ValueError, match="dotted Python identifier"):
        format_calls([call("get-weather")])


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>\nplan it\n</think>\n\n[f(a=1)]", ("plan it", "[f(a=1)]")),
        ("plan it\n</think>\n\nanswer", ("plan it", "answer")),  # <think> was in the prompt
        ("<think>\ncut off mid-thought", ("cut off mid-thought", "")),
        ("just an answer", (None, "just an answer")),
        ("<think>\n\n</think>\n\nx", ("", "x")),
        # bfcl-eval's Qwen handler and Qwen3's template: reasoning before the first </think>, answer after the last
        ("<think>\na\n</think>\nprinted </think>\n\n[f()]", ("a", "[f()]")),
    ],
)
def test_split_reasoning(response, expected):
    assert split_reasoning(response) == expected


# ---------------------------------------------------------------- BFCL's prompting decoder (the reward's reader)


@pytest.mark.parametrize("text, calls", [
    ("[f(a=1), g(b='x')]", [("f", {"a": 1}), ("g", {"b": "x"})]),
    ("f(a=1), g(b='x')", [("f", {"a": 1}), ("g", {"b": "x"})]),        # brackets added
    ("[f(a=1)", [("f", {"a": 1})]),                                     # a list cut before its ] is closed
    ("```\n[f(a=1)]\n```", [("f", {"a": 1})]),                          # backticks stripped
    ('get_weather("Paris")', [("get_weather", {})]),                   # positional arguments dropped
    ('f(**{"city": "Paris"})', [("f", {None: {"city": "Paris"}})]),   # ** unpacking: an argument named None
    ("[m.n.f(x=Paris, y=g(1), z=h(k=2), w=a[0])]", [("m.n.f", {"x": "Paris", "y": "g(1)", "z": {"h": {"k": 2}},
                                                              "w": "a[0]"})]),
    ("[f(a=+5, b=not True, c=-2.5)]", [("f", {"a": -5, "b": -1, "c": -2.5})]),  # BFCL negates any unary operand
    ("[f(a=2*3+1, b=7/2, c=(1, [2]))]", [("f", {"a": 7, "b": 3.5, "c": (1, [2])})]),
    ("", []),
    ("[]", []),
])
def test_decode_bfcl_calls_reads_what_bfcl_reads(text, calls):
    assert decode_bfcl_calls(text) == [{"name": n, "arguments": a} for n, a in calls]


@pytest.mark.parametrize("text", [
    "```python\n[f(a=1)]\n```",          # the language tag becomes part of the expression
    "[f(a=1)]\nThose are the calls.",    # trailing text
    "Calls: [f(a=1)]",
    "[f(a=1), 3]",
    "'[f(a=1)]'",                        # quotes are stripped only after brackets were added around them
    "[f(a=__import__('os').getcwd() + 'x')]",   # not numeric arithmetic: refused, never evaluated
    "[f(a=lambda: 1)]",
    "[f(a=1/0)]",
    "[f(a={1, 2})]",
    "[f(a=-x)]",
    "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
    "[" * 100 + "]" * 100,
])
def test_decode_bfcl_calls_refuses_what_bfcl_cannot_decode(text):
    assert isinstance(decode_bfcl_calls(text), ParseError)
