"""Tool-call parsing: BFCL python lists and Hermes <tool_call> blocks, hostile input, round trips."""

import random

import pytest

from tirl.tools.calls import ParseError, format_calls, looks_like_calls, parse_calls, split_reasoning


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
    ],
)
def test_split_reasoning(response, expected):
    assert split_reasoning(response) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[f(a=1)]", True),
        ("[]", True),
        ("f(a=1)", True),
        ('<tool_call>{"name": "f"}</tool_call>', True),
        ("<tool_call>broken", True),
        ("I cannot help with that: no function fits.", False),
        ("[Note] none of the tools apply", False),
        ("[f(1)]", False),
    ],
)
def test_looks_like_calls(text, expected):
    assert looks_like_calls(text) is expected
