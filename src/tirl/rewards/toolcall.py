"""D-CORE tool-call reward in [-3, 4] = format (0 or 1) + correctness (in [-3, 3]), per DESIGN.md.

The gold `answer` is a BFCL possible-answer list `[{"fn": {"arg": [allowed values]}}]` ("" among the
allowed values marks the argument optional), or a plain string / empty list when no call is expected
(irrelevance). Predictions are parsed from the text after `</think>` by `tirl.tools.calls.parse_calls`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tirl.errors import UserError
from tirl.rewards.math import completion_text
from tirl.tools.calls import ParseError, parse_calls, split_reasoning

EXACT, WORST = 3.0, -3.0
_THINK_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n\n", re.DOTALL)
_OPTIONAL = ""  # BFCL marks an optional argument by "" among its allowed values


class GoldAnswerError(UserError, ValueError):
    """A gold answer is not in BFCL possible-answer form."""


@dataclass(frozen=True)
class GoldCall:
    name: str
    allowed: dict[str, list[Any]]  # argument -> allowed values

    @property
    def required(self) -> set[str]:
        return {arg for arg, values in self.allowed.items() if _OPTIONAL not in values}


def parse_gold(answer: Any) -> list[GoldCall]:
    """BFCL possible answer -> gold calls; [] means no call is expected (plain-text answer)."""
    if isinstance(answer, str):
        stripped = answer.strip()
        if not stripped.startswith("["):
            return []  # a plain-text gold answer: the query needs no call
        try:
            answer = json.loads(stripped)
        except json.JSONDecodeError:
            return []
    if not isinstance(answer, list):
        raise GoldAnswerError(f"A tool-call answer must be a list like [{{'fn': {{'arg': [values]}}}}], got {type(answer).__name__}.")
    gold = []
    for item in answer:
        if not (isinstance(item, dict) and len(item) == 1):
            raise GoldAnswerError(f"Each gold call must be a one-key dict {{'fn': {{'arg': [values]}}}}, got {item!r}.")
        (name, args), = item.items()
        if not isinstance(args, dict) or not all(isinstance(v, list) for v in args.values()):
            raise GoldAnswerError(f"Gold call {name!r} must map each argument to a list of allowed values, got {args!r}.")
        gold.append(GoldCall(str(name), args))
    return gold


def _normalise(value: Any) -> Any:
    """JSON has no tuples: compare (1, 2) and [1, 2] as equal, recursively."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def value_allowed(value: Any, allowed: list[Any]) -> bool:
    """Is `value` equal to one of the allowed values?

    Beyond plain equality this follows BFCL's nested form: an allowed dict whose values are all lists
    is itself a possible answer (each key -> allowed values), and lists are matched element-wise.
    Booleans only equal booleans (True is not 1); ints equal floats (2 == 2.0).
    """
    value = _normalise(value)
    return any(_matches(value, _normalise(option)) for option in allowed)


def _matches(value: Any, option: Any) -> bool:
    if isinstance(value, bool) or isinstance(option, bool):
        return type(value) is type(option) and value == option
    if isinstance(value, dict) and isinstance(option, dict):
        if value.keys() == option.keys() and all(_matches(value[k], option[k]) for k in value):
            return True
        return all(isinstance(v, list) for v in option.values()) and _dict_matches(value, option)
    if isinstance(value, list) and isinstance(option, list):
        return len(value) == len(option) and all(_matches(v, o) for v, o in zip(value, option, strict=True))
    return value == option


def _dict_matches(value: dict, option: dict[str, list[Any]]) -> bool:
    if not set(value) <= set(option):
        return False
    for key, allowed in option.items():
        if key in value:
            if not value_allowed(value[key], allowed):
                return False
        elif _OPTIONAL not in allowed:
            return False
    return True


def _call_matches(pred: dict[str, Any], gold: GoldCall) -> bool:
    args = pred["arguments"]
    return (
        pred["name"] == gold.name
        and set(args) <= set(gold.allowed)
        and gold.required <= set(args)
        and all(value_allowed(v, gold.allowed[k]) for k, v in args.items())
    )


def calls_match_exactly(preds: list[dict[str, Any]], gold: list[GoldCall]) -> bool:
    """Every gold call matched by a distinct prediction, no extra predictions, order-insensitive."""
    if len(preds) != len(gold):
        return False
    ok = [[_call_matches(p, g) for p in preds] for g in gold]  # ok[gold][pred]

    def assign(gi: int, used: frozenset[int]) -> bool:  # backtracking: same-name calls may swap
        if gi == len(gold):
            return True
        return any(ok[gi][pi] and pi not in used and assign(gi + 1, used | {pi}) for pi in range(len(preds)))

    return assign(0, frozenset())


def _jaccard(a: Counter, b: Counter) -> float:
    union = sum((a | b).values())
    return 1.0 if union == 0 else sum((a & b).values()) / union


def _call_score(pred: dict[str, Any], gold: GoldCall) -> float:
    """Jaccard(param names) + #gold params whose value is right; at most 1 + len(gold.allowed)."""
    args = pred["arguments"]
    # Optional gold params the prediction leaves out are not missing names.
    gold_names = gold.required | (set(gold.allowed) & set(args))
    name_overlap = _jaccard(Counter(set(args)), Counter(gold_names))
    right_values = sum(
        (value_allowed(args[k], allowed) if k in args else _OPTIONAL in allowed) for k, allowed in gold.allowed.items()
    )
    return name_overlap + right_values


def partial_score(preds: list[dict[str, Any]], gold: list[GoldCall]) -> float:
    """Partial-credit correctness in [-3, 3] for a call list that is not an exact match.

    S = Jaccard(multiset of predicted names, multiset of gold names)
        + Σ over gold calls (in order) of the best still-unused same-name prediction's
          [Jaccard(its param names, the gold's param names) + #gold params with an allowed value],
    where an omitted optional gold param counts as neither a missing name nor a wrong value.
    Normalised by its maximum M = 1 + Σ_gold (1 + #params) and mapped linearly: -3 + 6·S/M.

    Worked example. Gold [{"get_weather": {"city": ["Paris"], "unit": ["celsius", ""]}},
    {"get_time": {"tz": ["CET"]}}], prediction [get_weather(city="Paris", unit="kelvin")]:
    names Jaccard({get_weather}, {get_weather, get_time}) = 1/2; get_weather: param Jaccard 1 +
    1 right value (city) = 2; get_time: no prediction, 0. S = 2.5, M = 1 + 3 + 2 = 6,
    correctness = -3 + 6·2.5/6 = -0.5 (and -0.5 + 1 = 0.5 with a well-formed <think> block).
    """
    score = _jaccard(Counter(p["name"] for p in preds), Counter(g.name for g in gold))
    used: set[int] = set()
    for g in gold:
        candidates = [(_call_score(p, g), i) for i, p in enumerate(preds) if i not in used and p["name"] == g.name]
        if candidates:
            best, index = max(candidates, key=lambda c: (c[0], -c[1]))
            score += best
            used.add(index)
    maximum = 1 + sum(1 + len(g.allowed) for g in gold)
    return WORST + (EXACT - WORST) * score / maximum


def format_reward(response: str) -> float:
    """1.0 if the response opens with a Qwen3 `<think>\\n…\\n</think>\\n\\n` block, else 0.0."""
    return 1.0 if _THINK_FORMAT.match(response) else 0.0


def correctness_reward(answer_text: str, answer: Any) -> float:
    """Correctness in [-3, 3] of the text after `</think>` against a BFCL possible answer.

    No call expected: plain text or `[]` -> 3, any call -> -3. Calls expected: exact -> 3, else
    `partial_score`; plain text, `[]` or unparsable -> -3. An empty answer (e.g. cut inside the
    reasoning) is -3 either way.
    """
    gold = parse_gold(answer)
    text = answer_text.strip()
    if not text:
        return WORST
    preds = parse_calls(text)
    if not gold:
        if isinstance(preds, ParseError):
            # Prose abstains; a broken call attempt (a `<tool_call>` or a leading `[`) does not.
            return WORST if ("<tool_call>" in text or text.startswith("[")) else EXACT
        return EXACT if not preds else WORST
    if isinstance(preds, ParseError) or not preds:
        return WORST
    return EXACT if calls_match_exactly(preds, gold) else partial_score(preds, gold)


def dcore_reward(response: str, answer: Any) -> float:
    """D-CORE reward in [-3, 4]: `format_reward` + `correctness_reward` of the text after `</think>`."""
    _, answer_text = split_reasoning(response)
    return format_reward(response) + correctness_reward(answer_text, answer)


def toolcall_exact(response: str, answer: Any) -> bool:
    """Accuracy: the calls after `</think>` match the gold exactly, or the model correctly made no call."""
    _, answer_text = split_reasoning(response)
    return correctness_reward(answer_text, answer) == EXACT


class ToolCallReward:
    """Reward callable over completions and the dataset's `answer` column (D-CORE reward)."""

    def __call__(self, completions: list[Any], answer: list[Any], **columns: Any) -> list[float]:
        if len(completions) != len(answer):
            raise ValueError(f"Got {len(completions)} completions but {len(answer)} answers; pass one answer per completion.")
        return [dcore_reward(completion_text(c), a) for c, a in zip(completions, answer, strict=True)]


class ToolCallExactReward:
    """Reward callable: 1.0 for an exact call match or a correct abstention, else 0.0."""

    def __call__(self, completions: list[Any], answer: list[Any], **columns: Any) -> list[float]:
        if len(completions) != len(answer):
            raise ValueError(f"Got {len(completions)} completions but {len(answer)} answers; pass one answer per completion.")
        return [float(toolcall_exact(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]
