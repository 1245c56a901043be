"""BFCL v3 data: the official question and possible-answer files, read as `BFCLItem`s.

The files come from the installed `bfcl_eval` package (`source="package"`) or from any directory with the
same layout (`BFCL_v4_<category>.json`, `possible_answer/BFCL_v4_<category>.json`,
`multi_turn_func_doc/*.json`). bfcl-eval 2026.3.23 ships v4 file names; every v3 category is among them.
Reading the files needs no bfcl-eval import (its import is heavy and has side effects), only its location.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tirl.data.jsonl import read_jsonl
from tirl.errors import UserError

FILE_PREFIX = "BFCL_v4"

# Our BFCLv3 names → the package's v4 file stems. The item ids inside the files keep the v4 stem
# (e.g. "simple_python_3"); bfcl-eval's checkers derive the category from the id, so ids stay as they are.
V3_TO_V4 = {
    "simple": "simple_python",
    "java": "simple_java",
    "javascript": "simple_javascript",
}
NON_LIVE = ["simple_python", "simple_java", "simple_javascript", "multiple", "parallel",
            "parallel_multiple", "irrelevance"]
LIVE = ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance",
        "live_relevance"]
MULTI_TURN = ["multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context"]
ALL_CATEGORIES = NON_LIVE + LIVE + MULTI_TURN

# Same lookup bfcl-eval uses (constants/executable_backend_config.py) to find a class's function docs.
MULTI_TURN_FUNC_DOC_FILES = {
    "GorillaFileSystem": "gorilla_file_system.json",
    "MathAPI": "math_api.json",
    "MessageAPI": "message_api.json",
    "TwitterAPI": "posting_api.json",
    "TicketAPI": "ticket_api.json",
    "TradingBot": "trading_bot.json",
    "TravelAPI": "travel_booking.json",
    "VehicleControlAPI": "vehicle_control.json",
}


class BFCLDataError(UserError, ValueError):
    """A BFCL data file is missing, malformed, or a category name is unknown."""


@dataclass
class BFCLItem:
    """One BFCL test entry. `question` is a list of turns, each a list of chat messages."""

    id: str
    category: str  # v4 stem, e.g. "simple_python", "live_irrelevance", "multi_turn_base"
    question: list[list[dict[str, Any]]]
    functions: list[dict[str, Any]]
    # AST categories: [{"fn": {"arg": [allowed values]}}]; multi-turn: per turn a list of call strings;
    # None for relevance/irrelevance (BFCL has no possible answers for them).
    ground_truth: list | None = None
    # Multi-turn only.
    initial_config: dict[str, Any] = field(default_factory=dict)
    involved_classes: list[str] = field(default_factory=list)
    missed_function: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # turn → held-out docs

    @property
    def is_multi_turn(self) -> bool:
        return self.category.startswith("multi_turn")

    @property
    def is_relevance(self) -> bool:
        return "relevance" in self.category  # covers irrelevance, live_irrelevance, live_relevance


def canonical_category(name: str) -> str:
    """Map a v3 name ("simple", "java", ...) or a v4 stem to the v4 stem; reject unknown names."""
    stem = V3_TO_V4.get(name, name)
    if stem not in ALL_CATEGORIES:
        known = sorted(set(ALL_CATEGORIES) | set(V3_TO_V4))
        raise BFCLDataError(f"Unknown BFCL category {name!r}; choose one of {known}.")
    return stem


def package_data_dir() -> Path:
    """Directory holding bfcl-eval's data files, found without importing bfcl_eval."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BFCLDataError(
            "bfcl-eval is not installed, so source='package' has no data; run scripts/install_bfcl.sh "
            "or pass source=<directory with BFCL_v4_*.json files>."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_entries(path: Path) -> list[dict[str, Any]]:
    """A BFCL data file (JSON lines, each an object with an id); a bad line raises an error naming file and line."""
    if not path.is_file():
        raise BFCLDataError(f"BFCL data file not found: {path}.")
    rows = []
    for line_no, row in read_jsonl(path, error=BFCLDataError):
        if not isinstance(row, dict) or "id" not in row:
            raise BFCLDataError(f"{path}:{line_no}: expected a JSON object with an 'id' field.")
        rows.append(row)
    return rows


def _multi_turn_functions(data_dir: Path, row: dict[str, Any]) -> tuple[list[dict], dict[str, list[dict]]]:
    """Function docs of the involved classes, minus the held-out ones (as bfcl-eval's
    populate_test_cases_with_predefined_functions does); returns (docs, turn → held-out docs)."""
    functions: list[dict] = []
    for class_name in row["involved_classes"]:
        if class_name not in MULTI_TURN_FUNC_DOC_FILES:
            raise BFCLDataError(f"{row['id']}: unknown involved class {class_name!r}.")
        functions.extend(read_function_docs(data_dir / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILES[class_name]))
    held_out: dict[str, list[dict]] = {}
    for turn, names in row.get("missed_function", {}).items():
        held_out[turn] = []
        for name in names:
            for index, doc in enumerate(functions):
                if doc["name"] == name:
                    held_out[turn].append(functions.pop(index))
                    break
    return functions, held_out


def read_function_docs(path: Path) -> list[dict[str, Any]]:
    """A multi-turn function-doc file: JSON lines without ids."""
    if not path.is_file():
        raise BFCLDataError(f"BFCL function-doc file not found: {path}.")
    return [doc for _, doc in read_jsonl(path, error=BFCLDataError)]


def load_bfcl(category: str, source: str | Path = "package", limit: int | None = None) -> list[BFCLItem]:
    """Load one BFCL category (v3 name or v4 stem) with its possible answers.

    `source` is "package" (the installed bfcl-eval's data) or a directory with the same layout.
    Questions and possible answers are paired by position, as bfcl-eval's runner does (some live ids differ
    in format between the two files); a length mismatch is an error.
    """
    stem = canonical_category(category)
    data_dir = package_data_dir() if str(source) == "package" else Path(source)
    questions = read_entries(data_dir / f"{FILE_PREFIX}_{stem}.json")
    answers = None
    if "relevance" not in stem:
        answer_path = data_dir / "possible_answer" / f"{FILE_PREFIX}_{stem}.json"
        answers = read_entries(answer_path)
        if len(answers) != len(questions):
            raise BFCLDataError(
                f"{answer_path} has {len(answers)} entries but its question file has {len(questions)}."
            )
    if limit is not None:
        questions = questions[:limit]
    items = []
    for index, row in enumerate(questions):
        ground_truth = answers[index]["ground_truth"] if answers is not None else None
        if stem.startswith("multi_turn"):
            functions, held_out = _multi_turn_functions(data_dir, row)
            items.append(BFCLItem(
                id=row["id"], category=stem, question=row["question"], functions=functions,
                ground_truth=ground_truth, initial_config=row.get("initial_config", {}),
                involved_classes=list(row["involved_classes"]), missed_function=held_out,
            ))
        else:
            items.append(BFCLItem(id=row["id"], category=stem, question=row["question"],
                                  functions=copy.deepcopy(row["function"]), ground_truth=ground_truth))
    return items


def category_size(category: str, source: str | Path = "package") -> int:
    """Number of entries in a category's question file (BFCL counts a missing category at full size)."""
    stem = canonical_category(category)
    data_dir = package_data_dir() if str(source) == "package" else Path(source)
    with (data_dir / f"{FILE_PREFIX}_{stem}.json").open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def _pick(options: Any, required: bool) -> tuple[bool, Any]:
    """(write it?, value) for one argument: its first allowed value, left out when BFCL allows omitting
    it ("" among the options) unless the function doc marks it required (the data has both at once), or
    when no value is allowed at all (a few live entries; no output satisfies those)."""
    values = [option for option in options if option != ""] if isinstance(options, list) else []
    if not values or ("" in options and not required):
        return False, None
    return True, _gold_value(values[0])


def _gold_value(value: Any) -> Any:
    # Inside possible answers a dict maps each key to its list of allowed values; other dicts are literal.
    if isinstance(value, dict) and all(isinstance(options, list) for options in value.values()):
        picked = {key: _pick(options, required=False) for key, options in value.items()}
        return {key: chosen for key, (write, chosen) in picked.items() if write}
    if isinstance(value, list):
        return [_gold_value(element) for element in value]
    return value


def gold_calls(ground_truth: list[dict[str, dict[str, list]]],
               functions: list[dict[str, Any]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The simplest call list the possible answers accept: per argument its first allowed value, optional
    arguments left out (`functions`, the entry's docs, say which arguments are required)."""
    required = {doc["name"]: set(doc.get("parameters", {}).get("required", [])) for doc in functions or []}
    calls = []
    for call in ground_truth:
        ((name, arguments),) = call.items()
        picked = {arg: _pick(options, arg in required.get(name, ())) for arg, options in arguments.items()}
        calls.append((name, {arg: value for arg, (write, value) in picked.items() if write}))
    return calls
