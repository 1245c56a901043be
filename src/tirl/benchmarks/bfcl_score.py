"""Score BFCL single-turn categories with bfcl-eval's own decoder and AST checker.

Each item goes through the steps of bfcl-eval 2026.3.23's `eval_runner.py` for its category
(`_evaluate_single_ast_entry` / `_evaluate_single_relevance_entry`): the text after `</think>` is decoded
with the prompting decoder (`default_decode_ast_prompting`, Python/Java/JavaScript by category), checked
for the call-list shape, then handed to `ast_checker` with the entry's original function docs (without the
prompt-time language hints). Relevance: a non-empty decoded call list is a call; irrelevance passes when
there is none, live_relevance when there is one.

One deliberate difference: bfcl-eval's Python decoder `eval`s any binary-operation or lambda argument it
meets. Untrusted model text never reaches that path here: such text is screened with `ast` first and only
plain numeric arithmetic (e.g. `x=2*3`) is let through; anything else counts as a decoding failure.
"""

from __future__ import annotations

import ast
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from tirl.data.bfcl_files import BFCLItem, canonical_category
from tirl.errors import UserError
from tirl.tools.text_format import split_reasoning

# The registry name whose config bfcl-eval's checkers consult (Qwen3-8B in prompting mode keeps dotted
# function names, i.e. underscore_to_dot=False).
BFCL_MODEL_NAME = "Qwen/Qwen3-8B"


class BFCLUnavailableError(UserError, RuntimeError):
    """bfcl-eval (or an import its checkers need) is missing."""


class UnsafeModelOutput(ValueError):
    """Model text whose decoding would make bfcl-eval evaluate arbitrary code."""


@lru_cache(maxsize=1)
def bfcl_eval_modules() -> SimpleNamespace:
    """Import bfcl-eval's checker entry points once.

    bfcl-eval creates result/, score/ and .file_locks/ under BFCL_PROJECT_ROOT at import time (by default
    next to site-packages), so point it at a temp directory unless the user chose one.
    """
    os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(tempfile.gettempdir(), "tirl_bfcl_project_root"))
    try:
        from bfcl_eval.constants.enums import Language, ReturnFormat
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
        from bfcl_eval.model_handler.utils import (
            default_decode_ast_prompting,
            default_decode_execute_prompting,
        )
        from bfcl_eval.utils import is_empty_output, is_function_calling_format_output
    except ImportError as err:
        raise BFCLUnavailableError(
            f"bfcl-eval's checkers cannot be imported ({err}); run scripts/install_bfcl.sh."
        ) from err
    return SimpleNamespace(
        Language=Language, ReturnFormat=ReturnFormat, ast_checker=ast_checker,
        decode_ast=default_decode_ast_prompting, decode_execute=default_decode_execute_prompting,
        is_empty_output=is_empty_output, is_function_calling_format_output=is_function_calling_format_output,
        multi_turn_checker=multi_turn_checker, multi_turn_utils=multi_turn_utils,
        execute=multi_turn_utils.execute_multi_turn_func_call,
        is_empty_execute_response=multi_turn_utils.is_empty_execute_response,
    )


def bfcl_available() -> bool:
    try:
        bfcl_eval_modules()
    except BFCLUnavailableError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- safety
_SAFE_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)


def _is_plain_arithmetic(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float, complex)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _SAFE_ARITHMETIC) and _is_plain_arithmetic(node.operand)
    if isinstance(node, ast.BinOp):
        return (isinstance(node.op, _SAFE_ARITHMETIC) and _is_plain_arithmetic(node.left)
                and _is_plain_arithmetic(node.right))
    return False


def screen_python_calls(answer: str) -> None:
    """Raise UnsafeModelOutput if bfcl-eval's Python decoder would `eval` something other than plain
    numeric arithmetic in `answer`. Text that does not parse is left to the decoder to reject."""
    text = answer.strip("`\n ")
    text = ("" if text.startswith("[") else "[") + text + ("" if text.endswith("]") else "]")
    try:
        tree = ast.parse(text.strip().strip("'"), mode="eval")
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda):
            raise UnsafeModelOutput("lambda arguments are not accepted")
        if isinstance(node, ast.BinOp) and not _is_plain_arithmetic(node):
            raise UnsafeModelOutput(f"only numeric arithmetic may appear in arguments, got {ast.unparse(node)!r}")


# ---------------------------------------------------------------------------------------------- results
@dataclass
class ItemResult:
    """One entry's verdict; the failure fields follow bfcl-eval's score-file entries."""

    id: str
    valid: bool
    error: list[str] = field(default_factory=list)
    error_type: str = ""
    model_result_raw: Any = None
    model_result_decoded: Any = None

    def score_entry(self, item: BFCLItem | None, model_name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.id, "model_name": model_name,
                                 "test_category": item.category if item else "", "valid": self.valid,
                                 "error": self.error, "error_type": self.error_type}
        if item is not None:
            entry["prompt"] = {"id": item.id, "question": item.question, "function": item.functions}
            entry["possible_answer"] = item.ground_truth
        entry["model_result_raw"] = self.model_result_raw
        entry["model_result_decoded"] = self.model_result_decoded
        return entry


@dataclass
class CategoryResult:
    category: str
    items: list[ItemResult]

    @property
    def correct_count(self) -> int:
        return sum(result.valid for result in self.items)

    @property
    def total_count(self) -> int:
        return len(self.items)

    @property
    def accuracy(self) -> float:
        return self.correct_count / self.total_count if self.items else 0.0


def _language(category: str, modules: SimpleNamespace) -> tuple[Any, Any]:
    if category == "simple_java":
        return modules.Language.JAVA, modules.ReturnFormat.JAVA
    if category == "simple_javascript":
        return modules.Language.JAVASCRIPT, modules.ReturnFormat.JAVASCRIPT
    return modules.Language.PYTHON, modules.ReturnFormat.PYTHON


def _decode_ast(answer: str, return_format: Any, modules: SimpleNamespace) -> Any:
    if return_format == modules.ReturnFormat.PYTHON:
        screen_python_calls(answer)
    return modules.decode_ast(answer, return_format, False)


def score_relevance_item(item: BFCLItem, response: str) -> ItemResult:
    """bfcl-eval's relevance/irrelevance rule: does the answer decode to a non-empty call list?"""
    modules = bfcl_eval_modules()
    answer = split_reasoning(response)[1]
    decoded, decode_error = None, ""
    try:
        decoded = _decode_ast(answer, modules.ReturnFormat.PYTHON, modules)
        contains_call = not modules.is_empty_output(decoded)
    except Exception as err:  # any decoder failure means "no call", as in bfcl-eval
        contains_call, decode_error = False, str(err)
    wants_call = "irrelevance" not in item.category
    if contains_call == wants_call:
        return ItemResult(item.id, True, model_result_raw=answer, model_result_decoded=decoded)
    if wants_call:
        return ItemResult(item.id, False, [f"Invalid syntax. Failed to decode AST when it should have. {decode_error}"],
                          "relevance_error:decoder_failed", answer, decoded)
    return ItemResult(item.id, False, ["Valid syntax. Successfully decode AST when it should not."],
                      "irrelevance_error:decoder_success", answer, decoded)


def score_ast_item(item: BFCLItem, response: str) -> ItemResult:
    """bfcl-eval's AST path: decode, check the call-list shape, then `ast_checker`."""
    modules = bfcl_eval_modules()
    language, return_format = _language(item.category, modules)
    answer = split_reasoning(response)[1]
    try:
        decoded = _decode_ast(answer, return_format, modules)
    except Exception as err:
        return ItemResult(item.id, False, [f"Invalid syntax. Failed to decode AST. {err}"],
                          "ast_decoder:decoder_failed", answer)
    if not modules.is_function_calling_format_output(decoded):
        return ItemResult(item.id, False, ["Did not output in the specified format. Note: the model_result is "
                                           "wrapped in a string to ensure json serializability."],
                          "ast_decoder:decoder_wrong_output_format", str(answer), str(decoded))
    verdict = modules.ast_checker(item.functions, decoded, item.ground_truth, language, item.category,
                                  BFCL_MODEL_NAME)
    if verdict["valid"]:
        return ItemResult(item.id, True, model_result_raw=answer, model_result_decoded=decoded)
    return ItemResult(item.id, False, list(verdict["error"]), verdict["error_type"], answer, decoded)


def score_ast(category: str, items: list[BFCLItem], responses: dict[str, str]) -> CategoryResult:
    """Score single-turn items from raw model responses (reasoning included) keyed by item id.
    An item with no response counts as wrong, like an entry missing from a BFCL result file."""
    results = []
    for item in items:
        if item.is_multi_turn:
            raise ValueError(f"{item.id} is multi-turn; score it with run_multi_turn / score_multi_turn.")
        if item.id not in responses:
            results.append(ItemResult(item.id, False, ["No model response for this entry."], "inference:missing"))
        elif item.is_relevance:
            results.append(score_relevance_item(item, responses[item.id]))
        else:
            results.append(score_ast_item(item, responses[item.id]))
    return CategoryResult(canonical_category(category), results)
