"""D-CORE tool-call reward in [-3, 4] = format (0 or 1) + correctness (in [-3, 3]), per DESIGN.md.

The verdict follows BFCL's checker, so the reward optimises what the benchmark scores: the text after the last
`</think>` is decoded as bfcl-eval's Python prompting decoder decodes it (`tirl.tools.calls.decode_bfcl_calls`)
and matched by BFCL's AST-checker rules (`tirl.rewards.call_match`), using the offered functions' docs (the RL
record's `tools`) for types and required parameters, and the record's `category` for what is expected:

- calls (a non-empty gold): the checker's verdict -> 3, else partial credit below 3 (`partial_score`); nothing
  decodable -> -3;
- no call (`[]` or plain-text gold, or an `irrelevance` category): 3 when nothing decodes to a call (prose, `[]`,
  text BFCL cannot decode), -3 for any decoded call — including `f("Paris")` and `f(**{...})`, which BFCL decodes;
- any call (`live_relevance`, whose gold BFCL leaves empty): 3 for any decoded call, -3 otherwise.

Stricter than the checker, never more lenient, in two places: an empty answer (nothing after the reasoning, or
generation cut inside it) is -3 everywhere, and a Qwen/Hermes `<tool_call>` block, which BFCL's prompting
decoder does not read, is -3 everywhere (never credited as a call, never as an abstention).

Gold forms understood (`parse_gold`): a BFCL possible-answer list `[{"fn": {"arg": [allowed values]}}]` ("" among
the allowed values marks the argument optional) as a list or JSON text; a list of `{"name", "arguments"}` objects
(each value exact); a Python call list with keyword arguments as text (`'[fn(arg=1)]'`, each value exact); `[]` or
plain text for "no call". Anything else that looks like calls is a `GoldAnswerError`.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from typing import Any

from tirl.errors import UserError
from tirl.rewards.call_match import OPTIONAL as _OPTIONAL
from tirl.rewards.call_match import GoldCall, calls_match, param_value_ok
from tirl.rewards.math import completion_text
from tirl.tools.calls import ParseError, decode_bfcl_calls, parse_calls
from tirl.tools.text_format import split_reasoning

EXACT, WORST = 3.0, -3.0
# A non-exact answer's partial credit stays below the exact score, so the reward never ranks an answer the checker
# fails (e.g. one BFCL's greedy parallel matching cannot assign) equal to a correct one.
BEST_PARTIAL = EXACT - 1e-3
_THINK_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n\n", re.DOTALL)
_GOLD_FORMS = ("a BFCL possible-answer list [{'fn': {'arg': [allowed values]}}], a list of {'name', 'arguments'} "
               "objects, a Python call list with keyword arguments like '[fn(arg=1)]', or [] / plain text when no "
               "call is expected")

__all__ = ["EXACT", "WORST", "GoldAnswerError", "GoldCall", "ToolCallExactReward", "ToolCallReward",
           "answer_text", "calls_match_exactly", "correctness_reward", "dcore_reward", "decode_answer",
           "format_reward", "parse_gold", "partial_score", "toolcall_exact"]


class GoldAnswerError(UserError, ValueError):
    """A gold answer in none of the forms the reward understands, or at odds with its category."""


def _plain(value: Any) -> Any:
    """Python literal -> JSON-like value (tuples become lists), as BFCL's possible answers are JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _looks_like_calls(text: str) -> bool:
    if text.startswith(("[", "{", "```")) or "<tool_call>" in text:
        return True
    try:
        body = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return isinstance(body, ast.Call) or (
        isinstance(body, (ast.List, ast.Tuple)) and any(isinstance(e, ast.Call) for e in body.elts))


def _gold_from_text(text: str) -> Any:
    stripped = text.strip()
    try:
        decoded = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        decoded = None
    if isinstance(decoded, (list, dict)):
        return decoded
    calls = parse_calls(stripped)
    if not isinstance(calls, ParseError):
        return [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    if _looks_like_calls(stripped):
        raise GoldAnswerError(f"The gold answer {stripped[:80]!r} looks like calls but is not readable "
                              f"({calls.reason}); write it as {_GOLD_FORMS}.")
    return []  # plain text: the query needs no call


def parse_gold(answer: Any) -> list[GoldCall]:
    """Gold answer in any understood form (module doc) -> gold calls; [] means no call is expected.

    Raises GoldAnswerError, naming the forms expected, for anything else.
    """
    if isinstance(answer, str):
        answer = _gold_from_text(answer)
    if not isinstance(answer, list):
        raise GoldAnswerError(f"A tool-call answer must be {_GOLD_FORMS}; got a {type(answer).__name__}.")
    gold = []
    for item in answer:
        if isinstance(item, dict) and set(item) == {"name", "arguments"}:
            if not (isinstance(item["name"], str) and isinstance(item["arguments"], dict)):
                raise GoldAnswerError(f"Gold call {item!r} needs a string 'name' and an 'arguments' object.")
            gold.append(GoldCall(item["name"], {k: [_plain(v)] for k, v in item["arguments"].items()}))
            continue
        if not (isinstance(item, dict) and len(item) == 1):
            raise GoldAnswerError(f"Each gold call must be a one-key dict {{'fn': {{'arg': [values]}}}} or a "
                                  f"{{'name', 'arguments'}} object, got {item!r}.")
        (name, args), = item.items()
        if not isinstance(args, dict) or not all(isinstance(v, list) for v in args.values()):
            raise GoldAnswerError(f"Gold call {name!r} must map each argument to a list of allowed values, got {args!r}.")
        gold.append(GoldCall(str(name), args))
    return gold


def _expectation(gold: list[GoldCall], category: Any) -> str:
    """"calls", "no_call" or "any_call" (BFCL's live_relevance: any call passes, its gold is empty)."""
    category = category if isinstance(category, str) else ""
    if "irrelevance" in category:
        if gold:
            raise GoldAnswerError(f"An {category!r} item expects no call but its answer has {len(gold)}; "
                                  "give answer [] or fix the category.")
        return "no_call"
    if "relevance" in category:
        if gold:
            raise GoldAnswerError(f"A {category!r} item passes with any call and has no possible answer; "
                                  "give answer [] or fix the category.")
        return "any_call"
    return "calls" if gold else "no_call"


def answer_text(response: str) -> str:
    """The answer as BFCL reads it: the text after the last `</think>` (its Qwen handler's rule); "" when
    generation was cut inside the reasoning (the text opens `<think>` and never closes it)."""
    return split_reasoning(response)[1]


def decode_answer(text: str) -> list[dict[str, Any]] | ParseError:
    """Calls in answer text as the reward (and BFCL) read them; a `<tool_call>` block is not BFCL's format."""
    if "<tool_call>" in text:
        return ParseError("a <tool_call> block is not BFCL's Python call-list format")
    return decode_bfcl_calls(text)


def calls_match_exactly(preds: list[dict[str, Any]], gold: list[GoldCall],
                        tools: list[dict[str, Any]] | None = None) -> bool:
    """BFCL's AST verdict (`tirl.rewards.call_match.calls_match`), with the functions' docs when given."""
    return calls_match(preds, gold, tools)


def _jaccard(a: Counter, b: Counter) -> float:
    union = sum((a | b).values())
    return 1.0 if union == 0 else sum((a & b).values()) / union


def _call_score(pred: dict[str, Any], gold: GoldCall, tools: list[dict[str, Any]] | None) -> float:
    """Jaccard(param names) + #gold params whose value passes the checker's value check; at most 1 + len(gold.allowed)."""
    args = pred["arguments"]
    # Optional gold params the prediction leaves out are not missing names.
    gold_names = gold.required | (set(gold.allowed) & set(args))
    name_overlap = _jaccard(Counter(set(args)), Counter(gold_names))
    right_values = sum((param_value_ok(gold, k, args[k], tools) if k in args else _OPTIONAL in allowed)
                       for k, allowed in gold.allowed.items())
    return name_overlap + right_values


def partial_score(preds: list[dict[str, Any]], gold: list[GoldCall], tools: list[dict[str, Any]] | None = None) -> float:
    """Partial-credit correctness in [-3, 3) for a call list the checker fails.

    S = Jaccard(multiset of predicted names, multiset of gold names)
        + Σ over gold calls (in order) of the best still-unused same-name prediction's
          [Jaccard(its param names, the gold's param names) + #gold params with an allowed value],
    where an omitted optional gold param counts as neither a missing name nor a wrong value, and "allowed"
    is the checker's per-value rule (`tirl.rewards.call_match.value_ok`, with the doc's types from `tools`).
    Normalised by its maximum M = 1 + Σ_gold (1 + #params), mapped linearly -3 + 6·S/M, and capped at
    BEST_PARTIAL (just below 3).

    Worked example. Gold [{"get_weather": {"city": ["Paris"], "unit": ["celsius", ""]}},
    {"get_time": {"tz": ["CET"]}}], prediction [get_weather(city="Paris", unit="kelvin")]:
    names Jaccard({get_weather}, {get_weather, get_time}) = 1/2; get_weather: param Jaccard 1 +
    1 right value (city) = 2; get_time: no prediction, 0. S = 2.5, M = 1 + 3 + 2 = 6,
    correctness = -3 + 6·2.5/6 = -0.5 (and -0.5 + 1 = 0.5 with a well-formed <think> block).
    """
    score = _jaccard(Counter(p["name"] for p in preds), Counter(g.name for g in gold))
    used: set[int] = set()
    for g in gold:
        candidates = [(_call_score(p, g, tools), i) for i, p in enumerate(preds) if i not in used and p["name"] == g.name]
        if candidates:
            best, index = max(candidates, key=lambda c: (c[0], -c[1]))
            score += best
            used.add(index)
    maximum = 1 + sum(1 + len(g.allowed) for g in gold)
    return min(WORST + (EXACT - WORST) * score / maximum, BEST_PARTIAL)


def format_reward(response: str) -> float:
    """1.0 if the response opens with a Qwen3 `<think>\\n…\\n</think>\\n\\n` block, else 0.0."""
    return 1.0 if _THINK_FORMAT.match(response) else 0.0


def _judge(text: str, answer: Any, tools: list[dict[str, Any]] | None, category: Any) -> tuple[float, bool]:
    """(correctness in [-3, 3], the checker's verdict) of answer text; see the module doc for the rules."""
    gold = parse_gold(answer)
    expected = _expectation(gold, category)
    if not text.strip() or "<tool_call>" in text:
        return WORST, False
    preds = decode_answer(text)
    called = not isinstance(preds, ParseError) and bool(preds)
    if expected == "no_call":
        return (WORST, False) if called else (EXACT, True)
    if expected == "any_call":
        return (EXACT, True) if called else (WORST, False)
    if not called:
        return WORST, False
    if calls_match(preds, gold, tools):
        return EXACT, True
    return partial_score(preds, gold, tools), False


def correctness_reward(answer_text: str, answer: Any, tools: list[dict[str, Any]] | None = None,
                       category: str | None = None) -> float:
    """Correctness in [-3, 3] of the answer text (after `</think>`) against a gold answer, given the offered
    functions' docs (`tools`) and the BFCL category when known. Raises GoldAnswerError for an unreadable gold."""
    return _judge(answer_text, answer, tools, category)[0]


def dcore_reward(response: str, answer: Any, tools: list[dict[str, Any]] | None = None,
                 category: str | None = None) -> float:
    """D-CORE reward in [-3, 4]: `format_reward` + `correctness_reward` of the text after the last `</think>`."""
    return format_reward(response) + correctness_reward(answer_text(response), answer, tools, category)


def toolcall_exact(response: str, answer: Any, tools: list[dict[str, Any]] | None = None,
                   category: str | None = None) -> bool:
    """Accuracy, BFCL's verdict: the calls after `</think>` pass the AST checker, or the model correctly made no
    call (irrelevance), or made one (live_relevance)."""
    return _judge(answer_text(response), answer, tools, category)[1]


def _column(values: list[Any] | None, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"Got {n} completions but {len(values)} {name!r} values; pass one per completion.")
    return list(values)


class ToolCallReward:
    """Reward callable over completions and the dataset's `answer` (and, when present, `tools` and `category`)
    columns: the D-CORE reward."""

    score = staticmethod(dcore_reward)

    def __call__(self, completions: list[Any], answer: list[Any], tools: list[Any] | None = None,
                 category: list[Any] | None = None, **columns: Any) -> list[float]:
        n = len(completions)
        answers = _column(answer, n, "answer")
        tools, category = _column(tools, n, "tools"), _column(category, n, "category")
        return [float(self.score(completion_text(c), a, t, k))
                for c, a, t, k in zip(completions, answers, tools, category, strict=True)]


class ToolCallExactReward(ToolCallReward):
    """Reward callable: 1.0 for BFCL's verdict "correct" (exact calls, or a correct abstention), else 0.0."""

    score = staticmethod(toolcall_exact)
