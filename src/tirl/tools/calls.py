"""Tool-call text <-> call dicts: BFCL python-list calls and Qwen/Hermes `<tool_call>` JSON blocks.

`parse_calls` is the strict reader (keyword arguments only; Hermes blocks too) for data the project writes;
`decode_bfcl_calls` reads model answers exactly as bfcl-eval's prompting decoder does, for the reward.

Model text is untrusted: it is parsed with `ast.parse` + `ast.literal_eval` (python form) or `json.loads`
(Hermes form) and never evaluated. A call is `{"name": str, "arguments": dict}`.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_CODE_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```$", re.DOTALL)
_DOTTED_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class ParseError:
    """Why text is not a call list. Falsy, so `if not calls:` also catches it; use isinstance to tell
    a parse failure from a valid empty call list `[]`."""

    reason: str

    def __bool__(self) -> bool:
        return False


def parse_calls(text: str) -> list[dict[str, Any]] | ParseError:
    """Parse `[f(a=1), mod.g(x="s")]`, a bare `f(a=1)`, or `<tool_call>{json}</tool_call>` blocks.

    Returns a list of `{"name", "arguments"}` dicts (possibly empty for `[]`) or a `ParseError`;
    never raises on any input string. One surrounding Markdown code fence is tolerated.
    """
    text = text.strip()
    fenced = _CODE_FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if "<tool_call>" in text:
        return _parse_hermes(text)
    return _parse_python(text)


def _parse_hermes(text: str) -> list[dict[str, Any]] | ParseError:
    bodies = _TOOL_CALL_BLOCK.findall(text)
    if len(bodies) != text.count("<tool_call>"):
        return ParseError("a <tool_call> block is not closed by </tool_call>")
    calls = []
    for body in bodies:
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, RecursionError) as err:
            return ParseError(f"<tool_call> body is not JSON: {err}")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return ParseError('<tool_call> body must be an object with a string "name"')
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):  # some models double-encode the arguments
            try:
                arguments = json.loads(arguments)
            except (json.JSONDecodeError, RecursionError):
                return ParseError('"arguments" is a string that is not JSON')
        if not isinstance(arguments, dict):
            return ParseError('"arguments" must be a JSON object')
        calls.append({"name": obj["name"], "arguments": arguments})
    return calls


MAX_NESTING = 64   # no real call list nests deeper; deeper input never reaches the parser


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return deepest


def _parse_python(text: str) -> list[dict[str, Any]] | ParseError:
    # A RecursionError inside ast.parse can leave CPython 3.11's AST recursion counter corrupted, after which any
    # later ast use in the process raises SystemError; model text nested that deep is refused before parsing.
    if _nesting_depth(text) > MAX_NESTING:
        return ParseError(f"nested deeper than {MAX_NESTING} brackets")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return ParseError(f"not Python syntax: {type(err).__name__}")
    if isinstance(tree, ast.Call):
        nodes = [tree]
    elif isinstance(tree, ast.List) or (isinstance(tree, ast.Tuple) and tree.elts):
        nodes = tree.elts  # a bracket-less `f(a=1), g(b=2)` is a tuple; `()` is not a call list
    else:
        return ParseError(f"expected a list of calls, got a {type(tree).__name__} expression")
    calls = []
    for node in nodes:
        call = _call_from_node(node)
        if isinstance(call, ParseError):
            return call
        calls.append(call)
    return calls


def _call_from_node(node: ast.expr) -> dict[str, Any] | ParseError:
    if not isinstance(node, ast.Call):
        return ParseError(f"list element is a {type(node).__name__}, not a call")
    name = _dotted_name(node.func)
    if name is None:
        return ParseError("a called function must be a plain or dotted name like a.b.c")
    if node.args:
        return ParseError(f"{name}() has positional arguments; only keyword arguments are allowed")
    arguments: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            return ParseError(f"{name}() uses **kwargs unpacking")
        if kw.arg in arguments:
            return ParseError(f"{name}() repeats argument {kw.arg!r}")
        try:
            arguments[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return ParseError(f"{name}({kw.arg}=...) is not a literal value")
    return {"name": name, "arguments": arguments}


# ------------------------------------------------------------------ BFCL's prompting decoder, without eval
_ARITHMETIC = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


class _Undecodable(Exception):
    """Text BFCL's decoder fails on (or that tirl's BFCL scorer refuses to let it evaluate)."""


def decode_bfcl_calls(answer_text: str) -> list[dict[str, Any]] | ParseError:
    """Decode answer text as bfcl-eval's Python prompting decoder does, as `{"name", "arguments"}` dicts.

    The same text is accepted, and decodes to the same values, as with `default_decode_ast_prompting` (bfcl-eval
    2026.3.23) behind tirl's BFCL scorer (`tirl.benchmarks.bfcl_score`), so a reward built on it agrees with the
    checker. Its rules, lenient and strict: surrounding backticks, newlines and spaces are stripped, brackets are
    added when missing (a bare `f(a=1)`, `f(a=1), g(b=2)` or a list cut before its `]`), then wrapping `'` quotes
    go; each element must be a call (a dotted name); **positional arguments are dropped** (`f("Paris")` is
    `f()`), `**{...}` becomes an argument named None; a bare name value is its name as a string, a call value
    with keywords a nested `{name: args}` dict, one without keywords its source text, a subscript its source
    text; a unary operator negates its constant operand (BFCL's quirk: `+5` reads -5); numeric arithmetic is
    computed (never `eval`ed) and any other operator or a lambda is refused, as tirl's scorer refuses it.
    `""` decodes to `[]`. Never raises; text nested deeper than MAX_NESTING brackets is refused.
    """
    text = answer_text.strip("`\n ")
    if not text.startswith("["):
        text = "[" + text
    if not text.endswith("]"):
        text = text + "]"
    text = text.strip().strip("'")
    if _nesting_depth(text) > MAX_NESTING:
        return ParseError(f"nested deeper than {MAX_NESTING} brackets")
    try:
        with warnings.catch_warnings():  # model text like `1f` would print a SyntaxWarning every step
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return ParseError(f"not Python syntax: {type(err).__name__}")
    try:
        _refuse_unsafe(tree)
        if isinstance(tree, ast.Call):
            nodes = [tree]
        elif isinstance(tree, (ast.List, ast.Tuple, ast.Set)):
            nodes = tree.elts
        else:
            raise _Undecodable(f"expected a list of calls, got a {type(tree).__name__} expression")
        calls = []
        for node in nodes:
            if not isinstance(node, ast.Call):
                raise _Undecodable(f"list element is a {type(node).__name__}, not a call")
            calls.append(_bfcl_call(node))
        return calls
    except _Undecodable as err:
        return ParseError(str(err))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError) as err:
        return ParseError(f"a value cannot be decoded: {type(err).__name__}")


def _refuse_unsafe(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda):
            raise _Undecodable("lambda arguments are not accepted")
        if isinstance(node, ast.BinOp) and not _is_arithmetic(node):
            raise _Undecodable("only numeric arithmetic may appear in arguments")


def _is_arithmetic(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float, complex)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.UAdd, ast.USub)) and _is_arithmetic(node.operand)
    if isinstance(node, ast.BinOp):
        return type(node.op) in _ARITHMETIC and _is_arithmetic(node.left) and _is_arithmetic(node.right)
    return False


def _arithmetic(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):
        value = _arithmetic(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    return _ARITHMETIC[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))


def _bfcl_name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _bfcl_call(node: ast.Call) -> dict[str, Any]:
    arguments: dict[Any, Any] = {}
    for kw in node.keywords:  # positional arguments are ignored, as BFCL ignores them
        arguments[kw.arg] = _bfcl_value(kw.value)
    return {"name": _bfcl_name(node.func), "arguments": arguments}


def _bfcl_value(node: ast.expr | None) -> Any:
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, ast.UnaryOp):
        if not isinstance(node.operand, ast.Constant):
            raise _Undecodable("a unary operator applies to a non-constant")
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_bfcl_value(v) for v in node.elts]
    if isinstance(node, ast.Dict):
        return {_bfcl_value(k): _bfcl_value(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.BinOp):
        return _arithmetic(node)
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        if not node.keywords:
            return ast.unparse(node)
        call = _bfcl_call(node)
        return {call["name"]: call["arguments"]}
    if isinstance(node, ast.Tuple):
        return tuple(_bfcl_value(v) for v in node.elts)
    if isinstance(node, ast.Subscript):
        return ast.unparse(node.value) + "[" + ast.unparse(node.slice) + "]"
    raise _Undecodable(f"unsupported value {type(node).__name__}")


def _dotted_name(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def format_calls(calls: list[dict[str, Any]]) -> str:
    """Render calls as the BFCL python list `[f(a=1), g(b='x')]`; `parse_calls` reads it back equal."""
    rendered = []
    for call in calls:
        name = call["name"]
        if not _DOTTED_NAME.match(name):
            raise ValueError(f"Call name {name!r} is not a dotted Python identifier; rename the tool.")
        args = ", ".join(f"{key}={value!r}" for key, value in call["arguments"].items())
        rendered.append(f"{name}({args})")
    return "[" + ", ".join(rendered) + "]"
