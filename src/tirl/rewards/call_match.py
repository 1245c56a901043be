"""Does a decoded call list satisfy a BFCL possible answer, given the offered functions' docs?

The rules are BFCL's AST checker's (bfcl-eval 2026.3.23, `eval_checker/ast_eval/ast_checker.py`), restated here so
the training reward needs no bfcl-eval import; `tests/test_reward_vs_bfcl.py` holds the two to the same verdicts:

- the number of calls must equal the number of gold calls; with several gold calls each gold call, in order, takes
  the first still-unused prediction that matches it (greedy, as BFCL's parallel checker; no backtracking);
- one call matches when the names are equal, every parameter the doc requires is given, every given parameter is
  in the doc and in the possible answer, each value passes the type and value check below, and every gold
  parameter left out has "" among its allowed values (= optional);
- type check against the doc's type (string, integer, float, boolean, array, tuple, dict, any; JSON-schema
  `number` / `object` read as float / dict): `type(value)` must be that Python type exactly (True is not an
  integer), except that an int passes for a float (converted), a tuple for a tuple (converted to a list), and a
  value of the gold's own type passes as a "variable" (BFCL's rule when the gold writes e.g. a string for an
  integer); array/tuple elements are checked one level deep against `items.type`;
- value check: strings compare after BFCL's standardisation (lowercase; spaces and `,./-_*^` removed; `'` -> `"`),
  also inside lists and as dict values; dicts key by key against each allowed dict (keys with "" optional); a list
  of dicts element-wise; everything else by `==` (so 2 == 2.0).

Without a doc for a function (data that carries no `tools`) each parameter's type is the type of its first
allowed value, with lists read as tuples (a tuple or a list passes) and all parameters without "" required.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

OPTIONAL = ""  # BFCL marks an optional argument by "" among its allowed values
_TYPES: dict[str, type] = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
                           "tuple": list, "dict": dict, "any": str}
_JSON_SCHEMA_NAMES = {"number": "float", "object": "dict"}
_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", float: "float", list: "tuple", dict: "dict"}
_STANDARDISE = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True)
class GoldCall:
    name: str
    allowed: dict[str, list[Any]]  # argument -> allowed values

    @property
    def required(self) -> set[str]:
        return {arg for arg, values in self.allowed.items() if OPTIONAL not in values}


@dataclass(frozen=True)
class ParamSpec:
    type: str            # a key of _TYPES
    items: str | None    # element type of an array / tuple


def standardise(text: str) -> str:
    """BFCL's string standardisation: drop spaces and `,./-_*^`, lowercase, single quotes -> double quotes."""
    return _STANDARDISE.sub("", text).lower().replace("'", '"')


def _type_name(spec_type: Any) -> str | None:
    if not isinstance(spec_type, str):
        return None
    name = _JSON_SCHEMA_NAMES.get(spec_type, spec_type)
    return name if name in _TYPES else None


def _gold_type(options: list[Any]) -> type | None:
    return next((type(option) for option in options if option != OPTIONAL), None)


def _derived(options: list[Any]) -> ParamSpec:
    gold = _gold_type(options)
    kind = _TYPE_NAMES.get(gold, "any")
    items = None
    if kind == "tuple":
        first = next((o for o in options if isinstance(o, list) and o), None)
        items = _TYPE_NAMES.get(type(first[0])) if first else None
    return ParamSpec(kind, items)


def param_spec(doc_param: Any, options: list[Any]) -> ParamSpec:
    """A parameter's type from its doc entry, or from its allowed values when the doc gives no known type."""
    if isinstance(doc_param, dict) and (kind := _type_name(doc_param.get("type"))) is not None:
        items = None
        if kind in ("array", "tuple"):
            item_doc = doc_param.get("items")
            items = _type_name(item_doc.get("type")) if isinstance(item_doc, dict) else None
        return ParamSpec(kind, items)
    return _derived(options)


def _type_ok(value: Any, options: list[Any], expected: type, nested: type | None) -> tuple[bool, bool]:
    """(passes, is a "variable"): BFCL's type_checker."""
    gold = _gold_type(options)
    variable = gold is not None and gold is not expected
    if type(value) is expected:
        if nested is None:
            return True, variable
        for option in options:  # one allowed value whose elements' types all fit is enough
            if type(option) is not list or all(_type_ok(v, option, nested, None)[0] for v in value):
                return True, variable
        return False, False
    if gold is not None and type(value) is gold:
        return True, True
    return False, False


def _std(value: Any) -> Any:
    return standardise(value) if type(value) is str else value


def _dict_ok(value: Any, options: list[Any]) -> bool:
    if not isinstance(value, dict):
        return False
    for option in options:
        if option == OPTIONAL or not isinstance(option, dict):
            continue
        if all(key in option and isinstance(option[key], list) and _std(v) in [_std(o) for o in option[key]]
               for key, v in value.items()) and all(
                key in value or (isinstance(allowed, list) and OPTIONAL in allowed) for key, allowed in option.items()):
            return True
    return False


def _list_of_dicts_ok(value: list, options: list[Any]) -> bool:
    for option in options:
        if isinstance(option, (list, str)) and len(option) == len(value):
            if all(_dict_ok(v, [o]) for v, o in zip(value, option, strict=True)):
                return True
    return False


def _list_ok(value: list, options: list[Any]) -> bool:
    standard = [_std(v) for v in value]
    return any(isinstance(option, (list, str)) and standard == [_std(o) for o in option] for option in options)


def value_ok(value: Any, options: list[Any], spec: ParamSpec) -> bool:
    """Does one argument value pass BFCL's type and value checks against its allowed values?"""
    expected = _TYPES[spec.type]
    nested = _TYPES[spec.items] if spec.type in ("array", "tuple") and spec.items else None
    if spec.type == "tuple" and type(value) is tuple:
        value = list(value)
    if spec.type == "float" and type(value) is int:
        value = float(value)
    ok, variable = _type_ok(value, options, expected, nested)
    if not ok:
        return False
    if not variable:
        if expected is dict:
            return _dict_ok(value, options)
        if expected is list and nested is dict:
            return _list_of_dicts_ok(value, options)
        if expected is str:
            return standardise(value) in [standardise(o) for o in options if type(o) is str]
        if expected is list:
            return _list_ok(value, options)
    try:
        return value in options
    except Exception:  # noqa: BLE001 - a value whose == raises (never from decoded text) matches nothing
        return False


def _doc_index(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for doc in tools or []:  # the first doc of a name wins, as BFCL's find_description
        if isinstance(doc, dict) and isinstance(doc.get("name"), str):
            index.setdefault(doc["name"], doc)
    return index


def _params(doc: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[str] | None]:
    """(properties, required) of a doc, or (None, None) without a usable doc."""
    if not doc or not isinstance(doc.get("parameters"), dict):
        return None, None
    params = doc["parameters"]
    properties = params.get("properties")
    if not isinstance(properties, dict):  # not a JSON-schema-style doc (e.g. xLAM's {param: spec} form)
        return None, None
    return properties, list(params.get("required") or [])


def call_matches(pred: dict[str, Any], gold: GoldCall, doc: dict[str, Any] | None = None) -> bool:
    """BFCL's simple_function_checker for one predicted call `{"name", "arguments"}` against one gold call."""
    if pred["name"] != gold.name:
        return False
    args = pred["arguments"]
    properties, required = _params(doc)
    if properties is None:
        properties, required = {arg: None for arg in gold.allowed}, sorted(gold.required)
    if any(arg not in args for arg in required):
        return False
    for arg, value in args.items():
        if arg not in properties or arg not in gold.allowed:
            return False
        if not value_ok(value, gold.allowed[arg], param_spec(properties[arg], gold.allowed[arg])):
            return False
    return all(arg in args or OPTIONAL in options for arg, options in gold.allowed.items())


def param_value_ok(gold: GoldCall, arg: str, value: Any, tools: list[dict[str, Any]] | None = None) -> bool:
    """One argument's value check (for partial credit), with the doc's type when `tools` has it."""
    properties, _ = _params(_doc_index(tools).get(gold.name))
    doc_param = (properties or {}).get(arg)
    return value_ok(value, gold.allowed[arg], param_spec(doc_param, gold.allowed[arg]))


def calls_match(preds: list[dict[str, Any]], gold: list[GoldCall], tools: list[dict[str, Any]] | None = None) -> bool:
    """BFCL's verdict for a decoded call list: same count, and each gold call in order greedily takes the first
    unused prediction that `call_matches` it (for one gold call: simple/multiple; for several: parallel)."""
    if len(preds) != len(gold):
        return False
    docs = _doc_index(tools)
    used: set[int] = set()
    for g in gold:
        index = next((i for i, p in enumerate(preds) if i not in used and call_matches(p, g, docs.get(g.name))), None)
        if index is None:
            return False
        used.add(index)
    return True
