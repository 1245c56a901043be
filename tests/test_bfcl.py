"""BFCL evaluation: data, prompting and aggregation on small fixtures; scoring against bfcl-eval's own
checkers (skipped, with the reason, when bfcl-eval is not installed: scripts/install_bfcl.sh)."""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
from pathlib import Path

import pytest

from tirl.benchmarks.bfcl import evaluate_bfcl, summarize, write_score_files
from tirl.benchmarks.bfcl_score import CategoryResult, ItemResult, bfcl_available, score_ast
from tirl.data.bfcl_files import (
    NON_LIVE,
    BFCLDataError,
    BFCLItem,
    canonical_category,
    gold_calls,
    load_bfcl,
)
from tirl.data.bfcl_prompt import (
    build_messages,
    strip_stale_reasoning,
    system_prompt,
    turn_messages,
)

FIXTURES = Path(__file__).parent / "fixtures" / "bfcl"
HAS_BFCL = bfcl_available()
needs_bfcl = pytest.mark.skipif(not HAS_BFCL, reason="bfcl-eval not installed (run scripts/install_bfcl.sh); "
                                                     "its checkers are the reference these tests compare with")
THINK = "<think>\nLet me pick the call.\n</think>\n\n"


# --------------------------------------------------------------------------------------- data (fixtures)
def test_load_fixture_pairs_questions_with_answers_and_maps_v3_names():
    items = load_bfcl("simple", source=FIXTURES)
    assert [item.id for item in items] == ["simple_python_0", "simple_python_1", "simple_python_2"]
    assert items[0].category == "simple_python"
    assert items[1].ground_truth == [{"math.factorial": {"number": [5]}}]
    assert load_bfcl("java", source=FIXTURES)[0].category == "simple_java"
    assert len(load_bfcl("simple_python", source=FIXTURES, limit=2)) == 2
    irrelevance = load_bfcl("irrelevance", source=FIXTURES)
    assert irrelevance[0].ground_truth is None and irrelevance[0].is_relevance


def gold_call_text(ground_truth: list[dict[str, dict[str, list]]], functions: list[dict] | None = None) -> str:
    """A right answer for a scripted model: the possible answers as BFCL's output format, `[f(a=1, b='x')]`."""
    rendered = [f"{name}({', '.join(f'{arg}={value!r}' for arg, value in arguments.items())})"
                for name, arguments in gold_calls(ground_truth, functions)]
    return "[" + ", ".join(rendered) + "]"


def test_bad_line_and_bad_category_name_the_problem(tmp_path):
    (tmp_path / "possible_answer").mkdir()
    good = (FIXTURES / "BFCL_v4_simple_python.json").read_text().splitlines()
    (tmp_path / "BFCL_v4_simple_python.json").write_text(good[0] + "\n{not json\n")
    with pytest.raises(BFCLDataError, match=r"BFCL_v4_simple_python.json:2: not valid JSON"):
        load_bfcl("simple", source=tmp_path)
    with pytest.raises(BFCLDataError, match="Unknown BFCL category 'simpel'"):
        canonical_category("simpel")
    with pytest.raises(BFCLDataError, match="not found"):
        load_bfcl("multiple", source=tmp_path)


def test_gold_call_text_leaves_out_optional_args_and_parses_back():
    item = load_bfcl("simple", source=FIXTURES)[0]
    text = gold_call_text(item.ground_truth, item.functions)
    assert text == "[calculate_triangle_area(base=10, height=5)]"
    call = ast.parse(text, mode="eval").body.elts[0]
    assert {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords} == {"base": 10, "height": 5}
    # "" allowed for a required parameter (it happens in the data): the doc's `required` wins.
    functions = [{"name": "f", "parameters": {"required": ["a"]}}]
    assert gold_calls([{"f": {"a": ["", 3], "b": ["", 1], "c": [{"k": ["v"], "o": [""]}]}}], functions) == [
        ("f", {"a": 3, "c": {"k": "v"}})]


# --------------------------------------------------------------------------------------- prompting
def test_build_messages_lists_functions_and_keeps_an_entrys_own_system_message():
    items = load_bfcl("simple", source=FIXTURES)
    messages = build_messages(items[0])
    assert [m["role"] for m in messages] == ["system", "user"]
    listed = json.loads(messages[0]["content"].split("that you can invoke.\n", 1)[1])
    assert [doc["name"] for doc in listed] == ["calculate_triangle_area"]
    assert listed[0]["description"].endswith("Note that the provided function is in Python 3 syntax.")
    assert "[func_name1(params_name1=params_value1" in messages[0]["content"]
    own = build_messages(items[2])
    assert own[0]["content"].endswith("\n\nAnswer briefly.") and own[0]["content"].startswith(system_prompt([])[:40])
    java = build_messages(load_bfcl("java", source=FIXTURES)[0])
    java_doc = json.loads(java[0]["content"].split("that you can invoke.\n", 1)[1])[0]
    assert {spec["type"] for spec in java_doc["parameters"]["properties"].values()} == {"string"}
    assert "not in string representation" in java_doc["parameters"]["properties"]["ids"]["description"]


def test_strip_stale_reasoning_keeps_only_the_current_turns_thinking():
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\n[f(a=1)]"},
        {"role": "tool", "name": "f(a=1)", "content": "1"},
        {"role": "assistant", "content": "<think>\nolder\n</think>\n\nDone."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nnow\n</think>\n\n[g()]"},
        {"role": "tool", "name": "g()", "content": "2"},
    ]
    cleaned = strip_stale_reasoning(messages)
    assert cleaned[1]["content"] == "[f(a=1)]" and cleaned[3]["content"] == "Done."
    assert cleaned[5]["content"] == messages[5]["content"]
    assert messages[1]["content"].startswith("<think>")  # input untouched
    cut = [{"role": "assistant", "content": "<think>\ncut"}, {"role": "user", "content": "q"}]
    assert strip_stale_reasoning(cut) == cut   # no </think>: Qwen3's template keeps the text as it is


# --------------------------------------------------------------------------------------- aggregation
def _category(name: str, correct: int, total: int) -> CategoryResult:
    return CategoryResult(name, [ItemResult(f"{name}_{i}", i < correct) for i in range(total)])


def test_summarize_uses_bfcl_v3_weighting():
    results = {c: _category(c, 1, 2) for c in NON_LIVE}  # every non-live category at 0.5
    results["simple_java"] = _category("simple_java", 2, 2)  # simple = mean(0.5, 1, 0.5) = 2/3
    results["live_simple"] = _category("live_simple", 3, 4)  # live: count-weighted
    results["live_multiple"] = _category("live_multiple", 0, 1)
    results["multi_turn_base"] = _category("multi_turn_base", 1, 1)
    sizes = {"live_parallel": 5}
    summary = summarize(results, sizes)
    assert summary["simple_ast"] == pytest.approx(2 / 3)
    assert summary["non_live"] == pytest.approx((2 / 3 + 0.5 * 4) / 5)
    # live: 3 correct of 4 + 0 of 1 + missing live_parallel counted at its full size 5 with accuracy 0.
    assert summary["live"] == pytest.approx(3 / 10)
    assert summary["multi_turn"] == pytest.approx(1 / 4)  # three multi-turn categories missing → 0
    assert summary["overall"] == pytest.approx((3 / 10 + (2 / 3 + 2) / 5 + 1 / 4) / 3)
    assert summary["complete"] is False


def test_write_score_files_bfcl_layout(tmp_path):
    results = {"simple_python": _category("simple_python", 1, 3), "live_relevance": _category("live_relevance", 1, 1)}
    paths = write_score_files(tmp_path, results)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == [
        "live/BFCL_v4_live_relevance_score.json", "non_live/BFCL_v4_simple_python_score.json"]
    lines = [json.loads(line) for line in (tmp_path / "non_live/BFCL_v4_simple_python_score.json").read_text().splitlines()]
    assert lines[0] == {"accuracy": 1 / 3, "correct_count": 1, "total_count": 3}
    assert [line["id"] for line in lines[1:]] == ["simple_python_1", "simple_python_2"]


# --------------------------------------------------------------------------------------- bfcl-eval checkers
AST_CATEGORIES = ["simple", "java", "javascript", "multiple", "parallel", "parallel_multiple", "live_simple",
                  "live_multiple", "live_parallel", "live_parallel_multiple"]


def _java_value(value, spec):
    kind = spec["type"]
    if kind == "boolean":
        return "true" if value else "false"
    if kind in ("integer", "short", "byte", "double"):
        return repr(value)
    if kind == "long":
        return f"{value}L"
    if kind == "float":
        return f"{value}f"
    if kind == "HashMap" and isinstance(value, dict):
        puts = " ".join(f'put("{k}", {json.dumps(v)});' for k, v in value.items())
        return f"new HashMap<String, Object>() {{{{ {puts} }}}}"
    if kind in ("ArrayList", "Array") and isinstance(value, list):
        inner = spec["items"]["type"]
        elements = ", ".join(_java_value(v, {"type": inner}) for v in value)
        return f"new ArrayList<>(Arrays.asList({elements}))" if kind == "ArrayList" else f"new {inner}[]{{{elements}}}"
    return f'"{value}"'


def _js_value(value, spec):
    kind = spec["type"]
    if kind == "Boolean":
        return "true" if value else "false"
    if kind in ("integer", "float"):
        return repr(value)
    if isinstance(value, str):
        # A variable name stands in for an array/object; strings are quoted.
        return value if kind in ("array", "dict") else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_js_value(v, {'type': 'any'})}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_js_value(v, {"type": "any"}) for v in value) + "]"
    return json.dumps(value)


def gold_text(item: BFCLItem) -> str:
    """The possible answers written as the model would write them for the item's language."""
    if item.category not in ("simple_java", "simple_javascript"):
        return THINK + gold_call_text(item.ground_truth, item.functions)
    render = _java_value if item.category == "simple_java" else _js_value
    docs = {doc["name"]: doc["parameters"]["properties"] for doc in item.functions}
    calls = [f"{name}({', '.join(f'{arg}={render(value, docs[name][arg])}' for arg, value in args.items())})"
             for name, args in gold_calls(item.ground_truth, item.functions)]
    return THINK + "[" + ", ".join(calls) + "]"


# bfcl-eval 2026.3.23's Java parser keeps only `new HashMap<..>()` of `new HashMap<..>() {{ put(..); }}` (it
# drops the anonymous-class body), so a HashMap argument with entries can never match its possible answer.
UNREACHABLE_GOLD = {"simple_java_1": "Missing dict key parameter: 'limit'."}


@needs_bfcl
@pytest.mark.parametrize("category", AST_CATEGORIES)
def test_gold_answers_score_full_marks(category):
    items = load_bfcl(category, limit=20)
    result = score_ast(category, items, {item.id: gold_text(item) for item in items})
    failures = {r.id: r.error[0] for r in result.items if not r.valid}
    expected = {k: v for k, v in UNREACHABLE_GOLD.items() if k in {item.id for item in items}}
    assert failures == expected
    assert result.correct_count == result.total_count - len(expected) == min(20, len(items)) - len(expected)
    assert len(items) >= 16


@needs_bfcl
@pytest.mark.parametrize("category", ["irrelevance", "live_irrelevance", "live_relevance"])
def test_relevance_categories(category):
    items = load_bfcl(category, limit=20)
    text_answer = {item.id: THINK + "None of the functions can answer this." for item in items}
    call_answer = {item.id: THINK + f"[{item.functions[0]['name']}(x=1)]" for item in items}
    expected_text, expected_call = (0.0, 1.0) if category == "live_relevance" else (1.0, 0.0)
    assert score_ast(category, items, text_answer).accuracy == expected_text
    assert score_ast(category, items, call_answer).accuracy == expected_call
    assert score_ast(category, items, {item.id: THINK + "[]" for item in items}).accuracy == expected_text


def _perturbations(text: str, item: BFCLItem) -> dict[str, str]:
    call = ast.parse(text, mode="eval").body.elts[0]
    keywords = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    required = item.functions[0]["parameters"]["required"]
    first = required[0]
    name = ast.unparse(call.func)

    def render(args, fn=name):
        return f"[{fn}({', '.join(f'{k}={v!r}' for k, v in args.items())})]"

    value = keywords[first]
    wrong_value = value + 7 if isinstance(value, (int, float)) and not isinstance(value, bool) else "zzz wrong"
    wrong_type = str(value) if not isinstance(value, str) else 12345
    return {
        "wrong_value": render({**keywords, first: wrong_value}),
        "missing_required": render({k: v for k, v in keywords.items() if k != first}),
        "extra_call": "[" + render(keywords)[1:-1] + ", " + render(keywords)[1:-1] + "]",
        "wrong_function_name": render(keywords, fn=name + "_v2"),
        "wrong_type": render({**keywords, first: wrong_type}),
    }


@needs_bfcl
def test_perturbations_match_bfcl_eval_called_directly():
    from bfcl_eval.constants.enums import Language, ReturnFormat
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.model_handler.utils import default_decode_ast_prompting

    items = [item for item in load_bfcl("simple", limit=12) if item.functions[0]["parameters"]["required"]][:8]
    checked = 0
    for item in items:
        gold = gold_call_text(item.ground_truth, item.functions)
        for kind, answer in _perturbations(gold, item).items():
            ours = score_ast("simple", [item], {item.id: THINK + answer}).items[0]
            direct = ast_checker(item.functions, default_decode_ast_prompting(answer, ReturnFormat.PYTHON),
                                 item.ground_truth, Language.PYTHON, "simple_python", "Qwen/Qwen3-8B")
            assert ours.valid is False, (item.id, kind, answer)
            assert (ours.valid, ours.error_type) == (direct["valid"], direct["error_type"]), (item.id, kind)
            checked += 1
    assert checked == 5 * len(items) >= 30


@needs_bfcl
def test_unsafe_argument_is_a_decode_failure_not_evaluated():
    item = load_bfcl("simple", limit=1)[0]
    answer = THINK + "[calculate_triangle_area(base=__import__('os').getpid() + 0, height=5)]"
    result = score_ast("simple", [item], {item.id: answer}).items[0]
    assert not result.valid and result.error_type == "ast_decoder:decoder_failed"
    arithmetic = THINK + "[calculate_triangle_area(base=5*2, height=5)]"
    assert score_ast("simple", [item], {item.id: arithmetic}).items[0].valid


def _keyword_calls(calls: list[str], item: BFCLItem) -> list[str]:
    """Ground-truth calls may pass arguments by position; bfcl-eval's decoder keeps only keywords, so name
    them from the environment method's signature."""
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    methods = {}
    for class_name in item.involved_classes:
        cls = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
        methods.update({name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction)})
    out = []
    for text in calls:
        call = ast.parse(text, mode="eval").body
        params = [p for p in inspect.signature(methods[call.func.id]).parameters if p != "self"]
        args = {params[i]: ast.literal_eval(a) for i, a in enumerate(call.args)}
        args.update({kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
        out.append(f"{call.func.id}({', '.join(f'{k}={v!r}' for k, v in args.items())})")
    return out


def _replay_gold(item: BFCLItem):
    def generate(messages):
        if messages[-1]["role"] == "tool":
            return THINK + "All done."
        turn = sum(1 for m in messages if m["role"] == "user") - 1
        calls = item.ground_truth[turn]
        return THINK + ("[" + ", ".join(_keyword_calls(calls, item)) + "]" if calls else "I cannot do that.")
    return generate


@needs_bfcl
def test_multi_turn_gold_replay_is_valid_and_silence_is_not():
    from tirl.benchmarks.bfcl import run_multi_turn

    item = load_bfcl("multi_turn_base", limit=1)[0]
    run = run_multi_turn(item, _replay_gold(item))
    assert run["valid"], run["error"]
    assert len(run["result"]) == len(item.ground_truth) and not run["force_quit"]
    assert [m["role"] for m in run["messages"][:2]] == ["system", "user"]
    assert any(m["role"] == "tool" for m in run["messages"])
    # A rerun of the same entry starts from a fresh environment (bfcl-eval caches instances by name).
    assert run_multi_turn(item, _replay_gold(item))["valid"]
    silent = run_multi_turn(item, lambda messages: THINK + "Sure.")
    assert not silent["valid"] and silent["error_type"] == "multi_turn:empty_turn_model_response"


@needs_bfcl
def test_miss_func_turn_announces_the_held_out_functions():
    item = load_bfcl("multi_turn_miss_func", limit=1)[0]
    ((turn, docs),) = item.missed_function.items()
    assert docs and all(doc["name"] not in {d["name"] for d in item.functions} for doc in docs)
    message = turn_messages(item, int(turn))[0]["content"]
    assert message.startswith(str(docs)) and message.endswith("What about now?")


@needs_bfcl
def test_prompt_matches_bfcl_eval_builder():
    from bfcl_eval.model_handler.utils import system_prompt_pre_processing_chat_model
    from bfcl_eval.utils import add_language_specific_hint_to_function_doc

    for category in ["simple_java", "simple_javascript", "live_multiple"]:
        item = load_bfcl(category, limit=3)[2]
        entry = {"id": item.id, "function": copy.deepcopy(item.functions), "question": copy.deepcopy(item.question)}
        entry = add_language_specific_hint_to_function_doc([entry])[0]
        expected = system_prompt_pre_processing_chat_model(entry["question"][0], entry["function"], item.id)
        assert build_messages(item) == expected


@needs_bfcl
def test_evaluate_bfcl_caches_generations_and_resumes(tmp_path):
    calls = []

    def generate(messages):
        calls.append(messages)
        return THINK + "[calculate_triangle_area(base=10, height=5)]"

    first = evaluate_bfcl(["simple"], generate, source=FIXTURES, out_dir=tmp_path)
    assert len(calls) == 3
    assert first["categories"]["simple_python"] == {"accuracy": 1 / 3, "correct_count": 1, "total_count": 3}
    second = evaluate_bfcl(["simple"], generate, source=FIXTURES, out_dir=tmp_path)
    assert len(calls) == 3 and second["categories"] == first["categories"]
    header = json.loads((tmp_path / "score/non_live/BFCL_v4_simple_python_score.json").read_text().splitlines()[0])
    assert header["correct_count"] == 1
