"""The training reward's verdict (`toolcall_exact`) against bfcl-eval's checker on real BFCL items.

Every item of the Python AST categories (simple, multiple, parallel, parallel_multiple and their live_ versions)
and the relevance categories (irrelevance, live_irrelevance, live_relevance) comes through the path that makes RL
prompts (`bfcl:<category>` records: `answer`, `tools`, `category`); each gets the gold call list and systematic
perturbations of it (other allowed values, wrong value, wrong type, dropped argument, extra / dropped call, wrong
function, positional arguments, call-list wrappings), or for relevance items call attempts of every shape. The
reward, which imports nothing from bfcl-eval, must give bfcl-eval's verdict (through `tirl.benchmarks.bfcl_score`, which
drives bfcl-eval's decoder and `ast_checker`) on every pair.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from tirl.benchmarks.bfcl_score import bfcl_available, score_ast_item, score_relevance_item
from tirl.data.bfcl_files import gold_calls, load_bfcl
from tirl.data.sources import load_records
from tirl.rewards.toolcall import dcore_reward, toolcall_exact

pytestmark = pytest.mark.skipif(not bfcl_available(), reason="bfcl-eval not installed (run scripts/install_bfcl.sh); "
                                                             "its checker is the oracle this test compares with")

AST_CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                  "live_parallel", "live_parallel_multiple"]
RELEVANCE_CATEGORIES = ["irrelevance", "live_irrelevance", "live_relevance"]
THINK = "<think>\nLet me pick the call.\n</think>\n\n"
# Each item gets the gold call list (as a list and bare) and a window of WINDOW further responses, the window
# moving from item to item so every perturbation meets every category many times; categories of under 100 items
# get every response. (All of them on every item, 101,210 pairs, agreed too; that takes ~2 minutes here.)
HEAD, WINDOW = 2, 8


def render(calls: list[tuple[str, dict[str, Any]]], positional: bool = False) -> list[str]:
    out = []
    for name, args in calls:
        parts = [repr(v) if positional else f"{k}={v!r}" for k, v in args.items()]
        out.append(f"{name}({', '.join(parts)})")
    return out


def wrong_value(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "zz"
    if isinstance(value, (int, float)):
        return value + 7
    if isinstance(value, list):
        return value + value[:1] if value else ["zz"]
    if isinstance(value, dict):
        return {**value, "zz_extra": 1}
    return "zz"


def wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return float(value)          # 3 -> 3.0: an integer parameter given a float
    if isinstance(value, float):
        return int(value) if value == int(value) else str(value)  # 2.0 -> 2 passes for a float; 2.5 -> "2.5"
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return list(value.items())
    return 0


def alternatives(ground_truth: list[dict], pick: int, with_optional: bool) -> list[tuple[str, dict[str, Any]]]:
    """Each argument's `pick`-th allowed value (cycling), optional ones included when `with_optional`."""
    calls = []
    for call in ground_truth:
        ((name, arguments),) = call.items()
        args = {}
        for arg, options in arguments.items():
            values = [o for o in options if o != ""]
            if not values or ("" in options and not with_optional):
                continue
            args[arg] = values[pick % len(values)]
        calls.append((name, args))
    return calls


def ast_responses(record: dict) -> list[str]:
    gt, tools = record["answer"], record["tools"]
    gold = gold_calls(gt, tools)
    texts = []
    for calls in (gold, alternatives(gt, 1, False), alternatives(gt, 1, True), alternatives(gt, 2, True)):
        rendered = render(calls)
        texts += ["[" + ", ".join(rendered) + "]", ", ".join(rendered)]
        # string values in another spelling BFCL's standardisation forgives (case, spaces, punctuation)
        texts.append("[" + ", ".join(render([(n, {k: v.upper().replace(" ", "_") if isinstance(v, str) else v
                                                      for k, v in a.items()}) for n, a in calls])) + "]")
    body = ", ".join(render(gold))
    texts += [f"```\n[{body}]\n```", f"```python\n[{body}]\n```", f"'[{body}]'", f"[{body}]\nThose are the calls.",
              f"Calls: [{body}]", f"[{body}", f"[{body}]]", f"\t[{body}]", "[" + ",\n".join(render(gold)) + "]",
              "[]", "None of the functions fits.", ""]
    texts.append("[" + ", ".join(render(gold, positional=True)) + "]")
    texts.append("[" + ", ".join(render(gold[::-1])) + "]")                  # calls in reverse order
    texts.append("[" + ", ".join(render(gold + gold[:1])) + "]")             # an extra call
    if len(gold) > 1:
        texts.append("[" + ", ".join(render(gold[:-1])) + "]")               # a dropped call
    other_names = [t["name"] for t in tools if t["name"] != gold[0][0]]
    for new_name in [gold[0][0] + "_v2"] + other_names[:1]:                  # a wrong function
        texts.append("[" + ", ".join(render([(new_name, gold[0][1])] + gold[1:])) + "]")
    for index, (name, args) in enumerate(gold[:2]):
        for arg in list(args)[:3]:
            for change in (wrong_value, wrong_type):
                changed = [*gold[:index], (name, {**args, arg: change(args[arg])}), *gold[index + 1:]]
                texts.append("[" + ", ".join(render(changed)) + "]")
            dropped = [*gold[:index], (name, {k: v for k, v in args.items() if k != arg}), *gold[index + 1:]]
            texts.append("[" + ", ".join(render(dropped)) + "]")
        extra = [*gold[:index], (name, {**args, "zz_unknown": 1}), *gold[index + 1:]]
        texts.append("[" + ", ".join(render(extra)) + "]")
    # an optional argument the gold leaves out, given with a value the possible answer does not list
    for call in gt[:1]:
        ((name, arguments),) = call.items()
        optional = [a for a, options in arguments.items() if "" in options]
        if optional:
            texts.append("[" + ", ".join(render([(name, {**gold[0][1], optional[0]: "zz"})] + gold[1:])) + "]")
    return texts


def placeholder(spec: dict) -> Any:
    kind = spec.get("type")
    return {"integer": 1, "float": 1.5, "boolean": True, "array": ["a"], "tuple": ["a"], "dict": {"k": "v"}}.get(kind, "a")


def relevance_responses(record: dict) -> list[str]:
    tools = record["tools"] or [{"name": "get_weather", "parameters": {"properties": {}, "required": ["city"]}}]
    properties = tools[0]["parameters"].get("properties", {})
    args = {p: placeholder(properties.get(p, {})) for p in tools[0]["parameters"].get("required", [])}
    name, second = tools[0]["name"], tools[-1]["name"]
    call = render([(name, args)])[0]
    return [
        "I cannot answer that with the functions given.", "[]", f"[{call}]", call, f"```\n[{call}]\n```",
        f"```python\n[{call}]\n```", f"[{call}]\nDone.", f'{name}("Paris")', f'{name}("a"), {second}("b")',
        f'{name}(**{{"city": "Paris"}})', f"[{name}(", f"[{call}, {call}]",
    ]


def select(texts: list[str], index: int, category_size: int) -> list[str]:
    head, rest = (0, texts) if category_size < 100 else (HEAD, texts[HEAD:])
    if category_size < 100:
        return texts
    start = index * WINDOW
    return texts[:head] + [rest[(start + j) % len(rest)] for j in range(min(WINDOW, len(rest)))]


def test_reward_verdict_equals_bfcl_checker_on_every_pair():
    start = time.perf_counter()
    items = {item.id: item for category in AST_CATEGORIES + RELEVANCE_CATEGORIES for item in load_bfcl(category)}
    pairs, disagreements, per_category, verdicts = 0, [], Counter(), Counter()
    for category in AST_CATEGORIES + RELEVANCE_CATEGORIES:
        records = list(load_records(f"bfcl:{category}", kind="rl"))
        for index, record in enumerate(records):
            item = items[record["id"]]
            relevance = category in RELEVANCE_CATEGORIES
            texts = relevance_responses(record) if relevance else ast_responses(record)
            for text in select(texts, index, len(records)):
                response = THINK + text
                ours = toolcall_exact(response, record["answer"], record["tools"], record["category"])
                if not text.strip():
                    assert not ours   # the reward's one stricter rule: nothing after the reasoning is never right
                    continue
                oracle = (score_relevance_item if relevance else score_ast_item)(item, response).valid
                pairs += 1
                per_category[category] += 1
                verdicts[oracle] += 1
                if ours != oracle:
                    disagreements.append((record["id"], text, ours, oracle))
                # The reward's top score is the checker's "correct", and only that.
                reward = dcore_reward(response, record["answer"], record["tools"], record["category"])
                assert (reward == 4.0) == oracle, (record["id"], text, reward)
    seconds = time.perf_counter() - start
    print(f"\n{pairs} (response, gold) pairs over {len(items)} BFCL items ({verdicts[True]} correct by the checker), "
          f"{len(disagreements)} disagreements, {seconds:.1f} s; per category {dict(per_category)}")
    assert not disagreements, f"{len(disagreements)} of {pairs} pairs disagree, e.g. {disagreements[:5]}"
    assert set(per_category) == set(AST_CATEGORIES + RELEVANCE_CATEGORIES)
    assert pairs > 25_000 and min(verdicts[True], verdicts[False]) > pairs // 5  # both verdicts, many times
