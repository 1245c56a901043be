"""BFCL prompting style for chat models (what bfcl-eval sends a prompting, non-FC model such as Qwen3).

Mirrors bfcl-eval 2026.3.23's default system prompt (`ret_fmt=python&tool_call_tag=False&func_doc_fmt=json&
prompt_fmt=plaintext&style=classic`), its language-specific function-doc hints, and how its Qwen handler
shows earlier reasoning. Kept free of bfcl-eval imports; tests compare it with bfcl-eval's own builder.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tirl.data.bfcl_files import BFCLItem
from tirl.tools.text_format import THINK_CLOSE, split_reasoning

_PERSONA = "You are an expert in composing functions."
_TASK = (
    "You are given a question and a set of possible functions. Based on the question, you will need to make "
    "one or more function/tool calls to achieve the purpose. If none of the functions can be used, point it "
    "out. If the given question lacks the parameters required by the function, also point it out."
)
_OUTPUT_FORMAT = "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]"
# bfcl-eval fills `{param_types}` with "" for the python format, hence the double space.
_TOOL_CALL_FORMAT = (
    "You should only return the function calls in your response.\n\nIf you decide to invoke any of the "
    f"function(s), you MUST put it in the format of {_OUTPUT_FORMAT}.  You SHOULD NOT include any other "
    "text in the response."
)
_MULTITURN_BEHAVIOR = (
    "At each turn, you should try your best to complete the tasks requested by the user within the current "
    "turn. Continue to output functions to call until you have fulfilled the user's request to the best of "
    "your ability. Once you have no more functions to call, the system will consider the current turn "
    "complete and proceed to the next turn or task."
)
ADDITIONAL_FUNCTIONS_PROMPT = "{functions}\nI have updated some more functions you can choose from. What about now?"


def _language_hint(category: str) -> str:
    if category == "simple_java":
        return " Note that the provided function is in Java 8 SDK syntax."
    if category == "simple_javascript":
        return " Note that the provided function is in JavaScript syntax."
    return " Note that the provided function is in Python 3 syntax."


def prompt_functions(item: BFCLItem) -> list[dict[str, Any]]:
    """Function docs as the model sees them: bfcl-eval's language hints added and, for Java/JavaScript,
    every parameter typed "string" (values are written in the language's own syntax)."""
    functions = copy.deepcopy(item.functions)
    for doc in functions:
        doc["description"] = doc["description"] + _language_hint(item.category)
        if item.category not in ("simple_java", "simple_javascript"):
            continue
        language = "Java" if item.category == "simple_java" else "JavaScript"
        for spec in doc["parameters"]["properties"].values():
            if spec["type"] == "any":
                spec["description"] += f" This parameter can be of any type of {language} object in string representation."
            else:
                spec["description"] += f" This is {language} {spec['type']} type parameter in string representation."
            list_types = ("ArrayList", "Array") if language == "Java" else ("array",)
            if spec["type"] in list_types:
                spec["description"] += (f" The list elements are of type {spec['items']['type']}; they are not "
                                        "in string representation.")
                del spec["items"]
            if language == "JavaScript" and spec["type"] == "dict" and "properties" in spec:
                spec["description"] += (" The dictionary entries have the following schema; they are not in "
                                        f"string representation. {json.dumps(spec['properties'])}")
                del spec["properties"]
            spec["type"] = "string"
    return functions


def system_prompt(functions: list[dict[str, Any]]) -> str:
    """bfcl-eval's default system prompt for prompting models, listing `functions` as indented JSON."""
    tools = f"Here is a list of functions in json format that you can invoke.\n{json.dumps(functions, indent=4)}\n"
    return f"{_PERSONA}{_TASK}\n\n{_TOOL_CALL_FORMAT}\n\n{_MULTITURN_BEHAVIOR}\n\n{tools}"


def with_system_prompt(first_turn: list[dict[str, Any]], functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put the BFCL system prompt first; an entry's own system message is appended after it."""
    messages = copy.deepcopy(first_turn)
    prompt = system_prompt(functions)
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = prompt + "\n\n" + messages[0]["content"]
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages


def build_messages(item: BFCLItem) -> list[dict[str, Any]]:
    """Chat messages for a single-turn item (or the first turn of a multi-turn item)."""
    return with_system_prompt(item.question[0], prompt_functions(item))


def turn_messages(item: BFCLItem, turn_index: int) -> list[dict[str, Any]]:
    """User messages that open turn `turn_index` of a multi-turn item (a held-out-function turn in
    miss_func becomes bfcl-eval's "I have updated some more functions" message)."""
    if turn_index == 0:
        return build_messages(item)
    held_out = item.missed_function.get(str(turn_index))
    if held_out is not None:
        # bfcl-eval formats the list with str(), i.e. Python repr, not JSON.
        return [{"role": "user", "content": ADDITIONAL_FUNCTIONS_PROMPT.format(functions=held_out)}]
    return copy.deepcopy(item.question[turn_index])


def strip_stale_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop `<think>` reasoning from assistant messages before the last real user query (a user message
    that is not a tool response), as Qwen3's chat template does (the answer after the last `</think>`); the current
    turn keeps its reasoning."""
    last_query = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        content = messages[index].get("content")
        if messages[index]["role"] == "user" and isinstance(content, str) and not (
            content.startswith("<tool_response>") and content.endswith("</tool_response>")
        ):
            last_query = index
            break
    cleaned = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and index < last_query:
            if THINK_CLOSE in message["content"]:
                message = {**message, "content": split_reasoning(message["content"])[1]}
        cleaned.append(message)
    return cleaned
