"""D-CORE stage 1: self-distil task-decomposition reasoning into SFT samples (DESIGN.md, "D-CORE stage 1").

Per item: (1) the decomposer returns a JSON list of sub-tasks, each tied to the gold call indices it covers;
(2) the policy reasons about each sub-task in turn (the sub-task is a user turn; a gold tool result, when the
data has one, is fed back as a tool turn); (3) templates compose one trajectory — overall analysis, numbered
sub-tasks, per-sub-task reasoning, final call list — as one sample (parallel) or one sample per step
(sequential); a query with no gold call gets the fixed irrelevance template; (4) only samples whose composed
calls AST-equal the gold are kept. Every drop has a named reason, counted in the report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tirl.data.prompts import task_messages
from tirl.pipelines.chat_backends import ChatBackend, ChatParams
from tirl.pipelines.runner import ItemResult
from tirl.rewards.toolcall import GoldAnswerError, calls_match_exactly, parse_gold
from tirl.tools.calls import ParseError, format_calls, parse_calls
from tirl.tools.text_format import split_reasoning, with_reasoning

DECOMPOSER_SYSTEM = (
    "You split a user request into sub-tasks. Reply with only a JSON list; each item is "
    '{"task": "<one sentence>", "calls": [<indices of the reference calls this sub-task needs>]}, '
    "covering every reference call exactly once, in order."
)
SUBTASK_PROMPT = "Sub-task {k}: {task}"
IRRELEVANCE_THINK = ("The request asks for something none of the given functions can do, or it lacks "
                     "information a function needs, so no function should be called.")
IRRELEVANCE_ANSWER = "None of the given functions can help with this request as asked."
_JSON_LIST = re.compile(r"\[.*\]", re.S)


@dataclass
class ToolItem:
    """One distillation input, whatever its source format."""

    id: str
    messages: list[dict]            # the conversation without the tool listing (the task prompt adds it)
    tools: list[dict]
    gold: Any                       # BFCL possible answer list (possibly empty = no call expected)
    tool_results: list[str] | None  # one per gold call in sequential data, else None


def _possible_answer(calls: list[dict]) -> list[dict]:
    """Concrete {"name","arguments"} calls → BFCL possible-answer form with exactly those values allowed."""
    return [{c["name"]: {k: [v] for k, v in c["arguments"].items()}} for c in calls]


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def to_tool_item(rec: dict) -> ToolItem:
    """BFCL-format prompt records, xLAM rows (query/tools/answers) and APIGen-MT conversations."""
    rid = str(rec["id"])
    tools = _loads(rec.get("tools", []))
    if "answer" in rec and "messages" in rec:  # BFCL-format RL prompt (tirl data contract)
        return ToolItem(rid, rec["messages"], tools, rec["answer"], rec.get("tool_results"))
    if "query" in rec and "answers" in rec:  # xLAM function-calling rows
        calls = _loads(rec["answers"])
        return ToolItem(rid, [{"role": "user", "content": rec["query"]}], tools, _possible_answer(calls), None)
    turns = rec.get("conversations")
    if turns is not None:  # APIGen-MT / ShareGPT: human, function_call, observation, gpt
        query = next(t["value"] for t in turns if t["from"] in ("human", "user"))
        calls, results = [], []
        for t in turns:
            if t["from"] == "function_call":
                call = _loads(t["value"])
                calls += call if isinstance(call, list) else [call]
            elif t["from"] == "observation" and len(results) < len(calls):
                results.append(t["value"] if isinstance(t["value"], str) else json.dumps(t["value"]))
        seq = results if len(results) == len(calls) and calls else None
        return ToolItem(rid, [{"role": "user", "content": query}], tools, _possible_answer(calls), seq)
    raise ValueError(f"Record {rid}: unknown format; expected 'messages'+'answer' (BFCL), 'query'+'answers' (xLAM) "
                     "or 'conversations' (APIGen-MT).")


def parse_decomposition(text: str, n_gold: int) -> list[dict] | str:
    """[{task, calls}] covering gold indices 0..n_gold-1 exactly once, or a drop reason."""
    _, answer = split_reasoning(text)
    match = _JSON_LIST.search(answer)
    if not match:
        return "decompose_no_json"
    try:
        items = json.loads(match.group(0))
    except (json.JSONDecodeError, RecursionError):
        return "decompose_bad_json"
    if not (isinstance(items, list) and items and all(
            isinstance(s, dict) and isinstance(s.get("task"), str) and s["task"].strip() and isinstance(s.get("calls"), list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in s["calls"]) for s in items)):
        return "decompose_bad_schema"
    covered = sorted(i for s in items for i in s["calls"])
    if covered != list(range(n_gold)):
        return "decompose_bad_coverage"
    return [{"task": s["task"].strip(), "calls": list(s["calls"])} for s in items]


def decomposer_messages(item: ToolItem) -> list[dict]:
    gold_text = "\n".join(f"{i}: {name}({json.dumps(args)})" for i, g in enumerate(parse_gold(item.gold))
                          for name, args in [(g.name, g.allowed)])
    query = item.messages[-1]["content"]
    return [{"role": "system", "content": DECOMPOSER_SYSTEM},
            {"role": "user", "content": f"Request: {query}\nReference calls:\n{gold_text}"}]


def analysis_text(subtasks: list[dict]) -> str:
    n = len(subtasks)
    head = f"The request has {n} sub-task{'s' if n != 1 else ''}."
    return head + "\n" + "\n".join(f"{k}. {s['task']}" for k, s in enumerate(subtasks, 1))


def compose_parallel(subtasks: list[dict], reasonings: list[str], calls: list[dict]) -> str:
    steps = "\n".join(f"Sub-task {k}: {r}" for k, r in enumerate(reasonings, 1))
    return with_reasoning(f"{analysis_text(subtasks)}\n{steps}", format_calls(calls))


def compose_step(subtasks: list[dict], k: int, reasoning: str, calls: list[dict]) -> str:
    """Step k (1-based) of a sequential trajectory; the plan is stated on the first step only."""
    plan = analysis_text(subtasks) + "\n" if k == 1 else ""
    return with_reasoning(f"{plan}Sub-task {k}: {reasoning}", format_calls(calls))


def irrelevance_text() -> str:
    return with_reasoning(IRRELEVANCE_THINK, IRRELEVANCE_ANSWER)


@dataclass
class DistillSettings:
    decomposer_params: ChatParams
    policy_params: ChatParams
    composition: str = "auto"       # auto (sequential when the data has tool results) | parallel | sequential


class Distiller:
    def __init__(self, decomposer: ChatBackend, policy: ChatBackend, settings: DistillSettings, seed: int = 0):
        if settings.composition not in ("auto", "parallel", "sequential"):
            raise ValueError(f"composition='{settings.composition}' must be auto, parallel or sequential.")
        self.decomposer, self.policy, self.settings, self.seed = decomposer, policy, settings, seed

    def _params(self, base: ChatParams, item_id: str, step: int) -> ChatParams:
        from tirl.pipelines.tirgen import stable_seed

        return ChatParams(**{**base.__dict__, "seed": stable_seed(self.seed, item_id, step)})

    def __call__(self, rec: dict) -> ItemResult:
        item = to_tool_item(rec)
        try:
            gold = parse_gold(item.gold)
        except GoldAnswerError:
            return ItemResult("dropped", "bad_gold")
        if not gold:  # irrelevance / missing information: the fixed template, nothing to ask a model
            sample = {"task": "toolcall", "messages": item.messages + [{"role": "assistant", "content": irrelevance_text()}],
                      "tools": item.tools, "loss_on": "last_assistant"}
            return ItemResult("kept", "", [sample], {"template": "irrelevance"})
        text = self.decomposer.complete(decomposer_messages(item), self._params(self.settings.decomposer_params, item.id, 0))[0]
        subtasks = parse_decomposition(text, len(gold))
        if isinstance(subtasks, str):
            return ItemResult("dropped", subtasks)
        sequential = self.settings.composition == "sequential" or (
            self.settings.composition == "auto" and item.tool_results is not None)
        # the policy sees the task's prompt (tools listed in the system message), as training will show it
        convo = task_messages({"task": "toolcall", "messages": item.messages, "tools": item.tools})[0]
        reasonings, step_calls = [], []
        for k, sub in enumerate(subtasks, 1):
            convo.append({"role": "user", "content": SUBTASK_PROMPT.format(k=k, task=sub["task"])})
            reply = self.policy.complete(convo, self._params(self.settings.policy_params, item.id, k))[0]
            reasoning, answer = split_reasoning(reply)
            calls = parse_calls(answer)
            if isinstance(calls, ParseError) or not calls:
                return ItemResult("dropped", "policy_unparsable_calls")
            if not reasoning:
                return ItemResult("dropped", "policy_no_reasoning")
            reasonings.append(reasoning)
            step_calls.append(calls)
            convo.append({"role": "assistant", "content": reply})
            for i in sub["calls"]:  # the gold tool result, when the data has one, is fed back
                if item.tool_results is not None:
                    convo.append({"role": "tool", "content": item.tool_results[i]})
        composed = [c for calls in step_calls for c in calls]
        # AST round trip of the final list, checked as the reward and BFCL check it (types from the docs)
        if not calls_match_exactly(parse_calls(format_calls(composed)), gold, item.tools):
            return ItemResult("dropped", "calls_not_gold")
        if not sequential:
            sample = {"task": "toolcall", "messages": item.messages + [
                {"role": "assistant", "content": compose_parallel(subtasks, reasonings, composed)}],
                "tools": item.tools, "loss_on": "last_assistant"}
            return ItemResult("kept", "", [sample], {"template": "parallel", "subtasks": len(subtasks)})
        samples, history = [], list(item.messages)
        for k, (sub, reasoning, calls) in enumerate(zip(subtasks, reasonings, step_calls, strict=True), 1):
            turn = {"role": "assistant", "content": compose_step(subtasks, k, reasoning, calls)}
            samples.append({"task": "toolcall", "messages": history + [turn], "tools": item.tools,
                            "loss_on": "last_assistant"})
            history = history + [turn] + [{"role": "tool", "content": item.tool_results[i] if item.tool_results else "{}"}
                                          for i in sub["calls"]]
        return ItemResult("kept", "", samples, {"template": "sequential", "subtasks": len(subtasks)})
