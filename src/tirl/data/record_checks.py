"""Is a record a usable SFT sample or RL prompt (DESIGN's data contracts)? Each check returns None, or the reason
it is not in one sentence (``tirl.data.sources`` adds the file and line)."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role", "content"} objects'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f'message {i} must be an object with "role" and "content"'
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; valid roles are {list(ROLES)}"
        if not isinstance(m["content"], str):
            return f"message {i} content must be a string, got {type(m['content']).__name__}"
        if m.get("env_spans") is not None and (problem := _env_spans_problem(m)):
            return f"message {i} {problem}"
    return None


def _env_spans_problem(message: dict) -> str | None:
    """``env_spans``: sorted, non-overlapping [start, end) character pairs of environment text in an assistant turn."""
    spans, n = message["env_spans"], len(message["content"])
    if message["role"] != "assistant":
        return f"has env_spans but role {message['role']!r}; only an assistant turn holds tool output inline"
    pos = 0
    for span in spans if isinstance(spans, list) else [None]:
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(type(x) is int for x in span)
                and pos <= span[0] <= span[1] <= n):
            return (f"env_spans must be sorted, non-overlapping [start, end] character offsets within its "
                    f"{n}-character content, got {spans!r}")
        pos = span[1]
    return None


def _tools_problem(record: dict) -> str | None:
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) and "name" in t for t in tools)):
        return '"tools" must be a list of function objects, each with a "name"'
    return None


def _possible_answer_problem(answer: Any) -> str | None:
    """BFCL possible answer: a list of one-key dicts {fn: {arg: [allowed values]}}; [] = no call expected."""
    if not isinstance(answer, list):
        hint = (" (a call list written as text, like \"[fn(arg=1)]\", is not one: give each argument its list of "
                "allowed values)") if isinstance(answer, str) else ""
        return (f'a toolcall "answer" must be a list like [{{"fn": {{"arg": [values]}}}}] ([] when no call is '
                f'expected), got {type(answer).__name__}{hint}')
    for call in answer:
        if not (isinstance(call, dict) and len(call) == 1):
            return f'each gold call must be a one-key object {{"fn": {{"arg": [values]}}}}, got {call!r}'
        (name, args), = call.items()
        if not isinstance(args, dict) or not all(isinstance(v, list) for v in args.values()):
            return f"gold call {name!r} must map each argument to a list of allowed values"
    return None


def sft_problem(record: Any) -> str | None:
    """Why ``record`` is not an SFT sample, or None if it is one."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    problem = _messages_problem(record.get("messages")) or _tools_problem(record)
    if problem:
        return problem
    if not any(m["role"] == "assistant" for m in record["messages"]):
        return "an SFT sample needs at least one assistant message"
    if record.get("loss_on", "assistant") not in ("assistant", "last_assistant"):
        return f'"loss_on" must be "assistant" or "last_assistant", got {record["loss_on"]!r}'
    if record.get("task") not in (None, "math", "toolcall"):
        return f'"task" (optional in an SFT sample) must be "math" or "toolcall", got {record["task"]!r}'
    return None


def rl_problem(record: Any) -> str | None:
    """Why ``record`` is not an RL prompt, or None if it is one."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    missing = [k for k in ("id", "task", "messages", "answer") if k not in record]
    if missing:
        return f"an RL prompt needs {missing} (fields: id, task, messages, answer, optional tools)"
    if record["task"] not in ("math", "toolcall"):
        return f'"task" must be "math" or "toolcall", got {record["task"]!r}'
    problem = _messages_problem(record["messages"]) or _tools_problem(record)
    if problem:
        return problem
    if record["messages"][-1]["role"] == "assistant":
        return "an RL prompt must not end with an assistant message; the policy writes that"
    if record["task"] == "math" and not isinstance(record["answer"], str):
        return f'a math "answer" must be a string, got {type(record["answer"]).__name__}'
    if record["task"] == "toolcall":
        return _possible_answer_problem(record["answer"]) or _category_problem(record)
    return None


def _category_problem(record: dict) -> str | None:
    """BFCL's relevance categories have no possible answer: irrelevance passes with no call, live_relevance with any."""
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        return f'"category" must be a string like "simple" or "irrelevance", got {type(category).__name__}'
    if category and "relevance" in category and record["answer"]:
        return (f'a "{category}" prompt has no possible answer (irrelevance: no call is right; live_relevance: any '
                'call is); give "answer": []')
    return None


def record_problem(record: Any, kind: str) -> str | None:
    if kind == "auto":
        kind = "rl" if isinstance(record, dict) and "task" in record and "answer" in record else "sft"
    return rl_problem(record) if kind == "rl" else sft_problem(record)
