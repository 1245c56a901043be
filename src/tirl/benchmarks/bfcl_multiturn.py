"""BFCL multi-turn: drive bfcl-eval's executable environments turn by turn, then score with its checker.

The loop mirrors bfcl-eval's `BaseHandler.inference_multi_turn_prompting`: per turn, add the user message
(or the "more functions" message of a held-out-function turn), then step: generate, decode the text after
`</think>` into calls, execute them in the environment, feed each result back as a `tool` message; the turn
ends when the answer decodes to no call or fails to decode. More than `max_steps_per_turn` steps
force-quits the whole entry (bfcl-eval's MAXIMUM_STEP_LIMIT is 20). Scoring mirrors
`_evaluate_single_multi_turn_entry` + `multi_turn_checker`.

bfcl-eval executes calls with `eval`. Model text only gets there as a call to one of the entry's own
environment methods with literal keyword arguments; any other decoded call is not executed (the model sees
an error result) and is left out of scoring. Environment instances live in a bfcl-eval module dict keyed by
model name and entry id, so each run uses a fresh name and removes its instances afterwards.
"""

from __future__ import annotations

import ast
import uuid
from collections.abc import Callable
from typing import Any

from tirl.benchmarks.bfcl_score import bfcl_eval_modules, screen_python_calls
from tirl.data.bfcl_files import BFCLItem
from tirl.data.bfcl_prompt import strip_stale_reasoning, turn_messages
from tirl.tools.text_format import split_reasoning

MAX_STEPS_PER_TURN = 20

GenerateFn = Callable[[list[dict[str, Any]]], str]


def _allowed_names(item: BFCLItem) -> set[str]:
    names = {doc["name"] for doc in item.functions}
    for held_out in item.missed_function.values():
        names.update(doc["name"] for doc in held_out)
    return names


def is_safe_call(call: str, allowed: set[str]) -> bool:
    """A decoded call may be executed only if it is `name(kw=<literal>, ...)` with `name` an entry method."""
    try:
        node = ast.parse(call, mode="eval").body
    except SyntaxError:
        return False
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in allowed):
        return False
    if node.args:
        return False
    try:
        for keyword in node.keywords:
            ast.literal_eval(keyword.value)
    except (ValueError, SyntaxError, TypeError):
        return False
    return all(keyword.arg is not None for keyword in node.keywords)


def decode_calls(answer: str) -> list[str]:
    """bfcl-eval's prompting decoder for execution (raises on text that is not a call list)."""
    modules = bfcl_eval_modules()
    screen_python_calls(answer)
    return modules.decode_execute(answer, False)


class _Environment:
    """The entry's environment instances inside bfcl-eval, under a private model name."""

    def __init__(self, item: BFCLItem) -> None:
        self.item = item
        self.model_name = f"tirl_{uuid.uuid4().hex[:12]}"
        self.long_context = "long_context" in item.category or "composite" in item.category
        self.allowed = _allowed_names(item)

    def execute(self, calls: list[str]) -> list[str]:
        modules = bfcl_eval_modules()
        safe = [call for call in calls if is_safe_call(call, self.allowed)]
        results, _ = modules.execute(safe, self.item.initial_config, self.item.involved_classes,
                                     self.model_name, self.item.id, long_context=self.long_context,
                                     is_evaL_run=False)
        by_call = iter(results)
        return [next(by_call) if is_safe_call(call, self.allowed)
                else "Error during execution: call rejected (only the listed functions with literal "
                     "keyword arguments can be executed)." for call in calls]

    def close(self) -> None:
        store = vars(bfcl_eval_modules().multi_turn_utils)
        for key in [key for key in store if key.startswith(self.model_name)]:
            del store[key]


def score_multi_turn(item: BFCLItem, model_result: list[list[str]], model_name: str | None = None) -> dict[str, Any]:
    """Score per-turn, per-step raw responses with bfcl-eval's multi-turn checker."""
    modules = bfcl_eval_modules()
    ground_truth = item.ground_truth or []
    if len(model_result) != len(ground_truth):
        return {"valid": False, "error_type": "multi_turn:force_terminated",
                "error": [f"Model was force-terminated during inference phase. The length of the model result "
                          f"turns ({len(model_result)}) does not match the length of the ground truth turns "
                          f"({len(ground_truth)})."], "decoded": []}
    allowed = _allowed_names(item)
    decoded_turns: list[list[list[str]]] = []
    for turn in model_result:
        decoded_turn = []
        for response in turn:
            try:
                calls = decode_calls(split_reasoning(response)[1])
            except Exception:  # as in bfcl-eval: undecodable steps are chatting, not calls
                continue
            calls = [call for call in calls if is_safe_call(call, allowed)]
            if not modules.is_empty_execute_response(calls):
                decoded_turn.append(calls)
        decoded_turns.append(decoded_turn)
    name = model_name or f"tirl_{uuid.uuid4().hex[:12]}"
    entry = {"id": item.id, "initial_config": item.initial_config, "involved_classes": item.involved_classes}
    try:
        verdict = modules.multi_turn_checker(decoded_turns, ground_truth, entry, item.category, name)
    finally:
        store = vars(modules.multi_turn_utils)
        for key in [key for key in store if key.startswith(name)]:
            del store[key]
    error = verdict.get("error_message", "")
    return {"valid": bool(verdict["valid"]), "error_type": verdict.get("error_type", ""),
            "error": [error] if error else [], "details": verdict.get("details"), "decoded": decoded_turns}


def run_multi_turn(item: BFCLItem, generate_fn: GenerateFn, max_steps_per_turn: int = MAX_STEPS_PER_TURN) -> dict[str, Any]:
    """Run one multi-turn entry with `generate_fn(messages) -> text` and score it.

    Returns {"id", "valid", "error", "error_type", "result" (per turn, per step raw texts), "decoded",
    "messages" (the full conversation), "force_quit"}.
    """
    if not item.is_multi_turn:
        raise ValueError(f"{item.id} is not a multi-turn entry; use score_ast for single-turn categories.")
    environment = _Environment(item)
    messages: list[dict[str, Any]] = []
    result: list[list[str]] = []
    force_quit = False
    try:
        for turn_index in range(len(item.question)):
            messages.extend(turn_messages(item, turn_index))
            turn_result: list[str] = []
            steps = 0
            while True:
                text = generate_fn(strip_stale_reasoning(messages))
                messages.append({"role": "assistant", "content": text})
                turn_result.append(text)
                try:
                    calls = decode_calls(split_reasoning(text)[1])
                except Exception:  # UnsafeModelOutput included
                    break  # not a call list: the model answered in text, the turn is over
                if bfcl_eval_modules().is_empty_execute_response(calls):
                    break
                for call, output in zip(calls, environment.execute(calls), strict=True):
                    messages.append({"role": "tool", "name": call, "content": output})
                steps += 1
                if steps > max_steps_per_turn:
                    force_quit = True
                    break
            result.append(turn_result)
            if force_quit:
                break
    finally:
        environment.close()
    verdict = score_multi_turn(item, result)
    return {"id": item.id, "valid": verdict["valid"], "error": verdict["error"], "error_type": verdict["error_type"],
            "result": result, "decoded": verdict["decoded"], "messages": messages, "force_quit": force_quit}
