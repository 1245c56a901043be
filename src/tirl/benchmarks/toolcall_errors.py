"""Where tool-call answers go wrong: one error kind per response, for the per-category breakdown that
``scripts/toolcall_errors.py`` prints.

A single accuracy hides trades between kinds of error. On the tiny model, RL raises `simple` by calling more often
and loses the requests for a function that is not offered, while wrong argument values do not move; this module
is how those figures are measured. Kinds, checked in this order:

- ``ok``: exact match, or a correct refusal (the `toolcall_exact` accuracy);
- ``no_answer``: nothing after the reasoning (cut inside ``<think>``, or empty);
- ``declined``: plain text where calls were expected;
- ``unparsable``: a call attempt that does not parse (cut short, broken syntax);
- ``called_irrelevant``: a call (as BFCL decodes it), or a `<tool_call>` block, where none was expected;
- ``n_calls``: parsed, but a different number of calls than the gold;
- ``names``: the right number of calls, with different function names;
- ``values_think_ok`` / ``values_think_bad``: the right functions, some argument wrong; split by whether every
  sub-task line of the ``<think>`` block restates a piece of the request verbatim (the copy that went wrong is
  then in the call, not in the reasoning).
"""

from __future__ import annotations

import re
from typing import Any

from tirl.rewards.toolcall import answer_text, decode_answer, parse_gold, toolcall_exact
from tirl.tools.calls import ParseError
from tirl.tools.text_format import split_reasoning

KINDS = ("ok", "no_answer", "declined", "unparsable", "called_irrelevant", "n_calls", "names", "values_think_ok",
         "values_think_bad")
# "1. Get the weather in Paris: get_weather." -> "Get the weather in Paris" (the function name, if any, is not part
# of the restatement)
_STEP_LINE = re.compile(r"^\d+\.\s+(.*?)(?::\s*[A-Za-z_]\w*(?:,\s*not given)?)?\.?$")


def _looks_like_call(text: str) -> bool:
    return text.startswith("[") or "<tool_call>" in text


def think_restates_request(reasoning: str, request: str) -> bool:
    """Every numbered sub-task line ("1. Get the weather in Paris: get_weather.") restates a verbatim, case-insensitive piece of the
    request; False when there are no such lines."""
    steps = [m.group(1).strip().lower() for line in reasoning.splitlines() if (m := _STEP_LINE.match(line.strip()))]
    return bool(steps) and all(step in request.lower() for step in steps)


def toolcall_error(response: str, answer: Any, request: str = "", tools: list[dict] | None = None,
                   category: str | None = None) -> str:
    """The error kind (see the module docstring) of one response against its gold answer, read as the reward reads
    them (the offered functions' docs `tools` and the `category` as in the RL record)."""
    if toolcall_exact(response, answer, tools, category):
        return "ok"
    gold = parse_gold(answer)
    reasoning = split_reasoning(response)[0]
    text = answer_text(response).strip()
    if not text:
        return "no_answer"
    if not gold and "relevance" in str(category or "").replace("irrelevance", ""):
        return "declined"   # live_relevance: any call was wanted
    if not gold:
        return "called_irrelevant"
    preds = decode_answer(text)
    if isinstance(preds, ParseError) or not preds:
        return "unparsable" if isinstance(preds, ParseError) and _looks_like_call(text) else "declined"
    if len(preds) != len(gold):
        return "n_calls"
    if sorted(p["name"] for p in preds) != sorted(g.name for g in gold):
        return "names"
    return "values_think_ok" if think_restates_request(reasoning or "", request) else "values_think_bad"


def prompt_group(record: dict) -> str:
    """The breakdown's row: the category, with irrelevance split into small talk and a missing function, and the
    number of functions offered (the relevance check is harder with more of them)."""
    from tirl.data.synthetic_toolcall import SMALL_TALK

    category = str(record.get("category", "?"))
    if category == "irrelevance":
        category += "/small_talk" if record["messages"][-1]["content"] in SMALL_TALK else "/missing_function"
    return f"{category} ({len(record.get('tools') or [])} offered)"
