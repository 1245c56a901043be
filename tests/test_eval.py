"""Evaluation: metric math by hand, loaders in each benchmark's layout, the cache, lazy ratio per group, and the
real entry point end to end (tiny model, CPU) for task=math and task=bfcl, including resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tirl.benchmarks.bfcl_run import lazy_by_group
from tirl.benchmarks.bfcl_score import CategoryResult, ItemResult, bfcl_available
from tirl.benchmarks.math_bench import BenchmarkError, load_benchmark
from tirl.benchmarks.math_eval import MathSample, bench_metrics, best_of_n_index, judge, pass_at_k
from tirl.benchmarks.results import CacheError, GenerationCache, markdown_table
from tirl.benchmarks.task_config import validate_eval
from tirl.config import CONFIG_DIR, ConfigError, runnable

torch.set_num_threads(1)
FIXTURES = Path(__file__).parent / "fixtures" / "bfcl"


def sample(text: str = "", calls: int = 0, passed: int = 0, tokens: int = 10) -> MathSample:
    return MathSample(text=text, response_tokens=tokens, model_tokens=tokens - 2, calls=calls, passed_calls=passed)


# ------------------------------------------------------------------------------------------------ metrics
def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)        # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)       # 1 - C(3,3)/C(5,3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)    # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_best_of_n_picks_highest_code_pass_rate_then_boxed_then_earliest():
    samples = [sample("no code \\boxed{1}"), sample("1/2", 2, 1), sample("2/3", 3, 2), sample("2/3 too", 3, 2)]
    assert best_of_n_index(samples) == 2                          # 2/3 beats 1/2 and no code; earliest of ties
    tied = [sample("x", 1, 1), sample("y \\boxed{4}", 1, 1)]
    assert best_of_n_index(tied) == 1                             # equal rate: the one with an answer
    assert best_of_n_index([sample("a"), sample("b")]) == 0


def test_bench_metrics_avg_pass_best_of_n_and_tokens():
    # problem 1: gold 4; samples: wrong (runs code), right (no code) → best-of-n picks the wrong one
    # problem 2: gold 1/2; both right
    p1 = [sample("\\boxed{5}", 1, 1, tokens=20), sample("\\boxed{4}", 0, 0, tokens=10)]
    p2 = [sample("\\boxed{0.5}", 1, 0, tokens=30), sample("\\boxed{\\frac{1}{2}}", 0, 0, tokens=40)]
    corrects = [judge(p1, "4"), judge(p2, "\\frac12")]
    assert corrects == [[False, True], [True, True]]
    m = bench_metrics([p1, p2], corrects, [1, 2])
    assert m["avg@2"] == pytest.approx(75.0)                      # (1/2 + 2/2) / 2
    assert m["pass@1"] == pytest.approx(75.0) and m["pass@2"] == pytest.approx(100.0)
    assert m["best_of_n"] == pytest.approx(50.0)                  # p1 → sample 0 (wrong); p2 → sample 0 (right)
    assert m["mean_response_tokens"] == pytest.approx(25.0) and m["total_tokens"] == 100.0
    assert m["code_pass_rate"] == pytest.approx(50.0)             # 1 of 2 calls ran


# ------------------------------------------------------------------------------------------------ loaders
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loaders_read_each_benchmark_layout(tmp_path):
    write_jsonl(tmp_path / "math500.jsonl", [{"problem": "1+1?", "answer": "2", "unique_id": "test/a/1.json"}])
    write_jsonl(tmp_path / "aime24.jsonl", [{"ID": "2024-I-1", "Problem": "P", "Answer": 204, "Solution": "s"}])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": 7, "question": "Q", "final_answer": ["$3$", "$4$"]}]),
                   tmp_path / "olympiadbench.parquet")
    write_jsonl(tmp_path / "minerva.jsonl", [{"question": "Q1", "answer": "1"}, {"question": "Q2", "answer": "2"}])
    (m,) = load_benchmark("math500", str(tmp_path))
    (a,) = load_benchmark("aime24", str(tmp_path))
    (o,) = load_benchmark("olympiadbench", str(tmp_path))
    minerva = load_benchmark("minerva", str(tmp_path), limit=1)
    assert (m.id, m.problem, m.answer) == ("math500/test/a/1.json", "1+1?", "2")
    assert (a.id, a.problem, a.answer) == ("aime24/2024-I-1", "P", "204")
    assert (o.id, o.answer) == ("olympiadbench/7", "$3$, $4$")
    assert [p.id for p in minerva] == ["minerva/0"]
    write_jsonl(tmp_path / "amc23.jsonl", [{"question": "Q"}])
    with pytest.raises(BenchmarkError, match="row 0 has no problem"):
        load_benchmark("amc23", str(tmp_path))
    with pytest.raises(BenchmarkError, match="No aime25.jsonl"):
        load_benchmark("aime25", str(tmp_path))


# ------------------------------------------------------------------------------------------------ cache, table
def test_cache_round_trips_ignores_a_torn_last_line_and_rejects_damage(tmp_path):
    cache = GenerationCache(tmp_path / "c.jsonl")
    cache.put("a", [1, 2])
    cache.put("b", {"x": "y"})
    with (tmp_path / "c.jsonl").open("a") as handle:
        handle.write('{"id": "c", "rec')                          # a killed write
    again = GenerationCache(tmp_path / "c.jsonl")
    assert len(again) == 2 and again["a"] == [1, 2] and "c" not in again
    (tmp_path / "d.jsonl").write_text('{"id": "a", "record": 1}\nnot json\n{"id": "b", "record": 2}\n')
    with pytest.raises(CacheError, match="d.jsonl:2"):
        GenerationCache(tmp_path / "d.jsonl")


def test_markdown_table_layout():
    table = markdown_table({"math500": {"avg@1": 12.345, "problems": 3.0}, "aime24": {"avg@1": 0.0}}, ["avg@1", "problems"])
    assert table.splitlines() == ["| name | avg@1 | problems |", "|---|---|---|",
                                  "| math500 | 12.35 | 3.00 |", "| aime24 | 0.00 |  |"]


# ------------------------------------------------------------------------------------------------ lazy ratio
def test_lazy_ratio_per_group_counts_whole_words_and_multi_turn_steps():
    lazy = "<think>\n" + "wait but however " + "x " * 300 + "\n</think>\n\n[f(a=1)]"
    short = "<think>\nwait but however\n</think>\n\n[f(a=1)]"
    waiting = "<think>\n" + "awaits butter " * 200 + "\n</think>\n\n[f(a=1)]"   # not whole words
    results = {
        "parallel": CategoryResult("parallel", [ItemResult("p0", False, model_result_raw=lazy),
                                                ItemResult("p1", False, model_result_raw=short),
                                                ItemResult("p2", True, model_result_raw=lazy),
                                                ItemResult("p3", False, model_result_raw=waiting)]),
        "live_irrelevance": CategoryResult("live_irrelevance", [ItemResult("i0", False, model_result_raw=lazy)]),
        "multi_turn_base": CategoryResult("multi_turn_base", [
            ItemResult("m0", False, model_result_raw=[[lazy, short], [lazy]]),
            ItemResult("m1", True, model_result_raw=[[lazy]])]),
        "simple_python": CategoryResult("simple_python", [ItemResult("s0", False, model_result_raw=lazy)]),
    }
    ratios = lazy_by_group(results, lambda text: len(text.split()))
    assert ratios == {"parallel": 0.25, "irrelevance": 1.0, "multi_turn": 0.5}   # 1/4, 1/1, 2 of 4 steps


# ------------------------------------------------------------------------------------------------ config
@pytest.fixture(scope="module")
def hydra_configs():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def eval_config(overrides: list[str], out_dir: Path):
    cfg = compose("eval", overrides=overrides, return_hydra_config=True)
    return runnable(cfg, str(out_dir))


def test_bench_override_and_mistakes_end_in_one_sentence(hydra_configs, tmp_path):
    _, task = validate_eval(eval_config(["bench=[math500,aime24]"], tmp_path))
    assert task.bench == ["math500", "aime24"] and task.n_samples == 1
    for overrides, needle in [(["bench=[math5000]"], "Unknown math benchmark 'math5000'"),
                              (["task.pass_k=[1,4]"], "pass@k needs 1 <= k <= task.n_samples"),
                              (["task=bfcl", "task.categories=[simpel]"], "Unknown BFCL category 'simpel'"),
                              (["task=bfcl", "bench=[math500]"], "use it with task=math"),
                              (["+task.n_sample=2"], "did you mean 'n_samples'?")]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("?", r"\?")) as err:
            validate_eval(eval_config(overrides, tmp_path))
        assert "\n" not in str(err.value) and str(err.value).endswith(".")


# ------------------------------------------------------------------------------------------------ end to end
TINY = ["model.name_or_path=tiny", "device=cpu", "logger=csv", "rollout.max_new_tokens=24",
        "rollout.max_total_tokens=48", "rollout.max_prompt_tokens=384", "rollout.max_tool_rounds=1"]


def test_math_end_to_end_two_benchmarks_and_resume(hydra_configs, tmp_path):
    from tirl.evaluate import run

    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    write_jsonl(bench_dir / "math500.jsonl", [{"problem": f"What is {i}+1?", "answer": str(i + 1),
                                               "unique_id": f"u{i}"} for i in range(3)])
    write_jsonl(bench_dir / "aime24.jsonl", [{"ID": f"2024-{i}", "Problem": "Find n.", "Answer": i} for i in range(2)])
    overrides = TINY + ["bench=[math500,aime24]", f"task.bench_dir={bench_dir}", "task.n_samples=2",
                        "task.pass_k=[1,2]", "task.batch_size=2", "sandbox.workers=1",
                        "rollout.self_correction.enabled=true", f"task.out_dir={tmp_path / 'out'}"]
    metrics = run(eval_config(overrides, tmp_path / "run1"))
    assert metrics["test/math/math500/problems"] == 3 and metrics["test/math/aime24/problems"] == 2
    assert metrics["test/math/math500/samples"] == 6 and metrics["test/math/math500/generated"] == 3
    assert 0 <= metrics["test/math/average/avg@2"] <= 100
    assert metrics["test/math/math500/pass@2"] >= metrics["test/math/math500/pass@1"]
    assert metrics["test/math/math500/mean_response_tokens"] > 0
    results = json.loads((tmp_path / "out" / "math_results.json").read_text())
    assert set(results["results"]) == {"math500", "aime24", "average"}
    assert "| math500 |" in (tmp_path / "out" / "math_results.md").read_text()
    assert (tmp_path / "run1" / "csv" / "metrics.csv").is_file()
    again = run(eval_config(overrides, tmp_path / "run2"))           # same out_dir: everything cached
    assert again["test/math/math500/generated"] == 0 and again["test/math/aime24/generated"] == 0
    assert {k: v for k, v in again.items() if "generated" not in k} == {
        k: v for k, v in metrics.items() if "generated" not in k}
    changed = run(eval_config(overrides[:-1] + ["task.n_samples=1", "task.pass_k=[1]", "bench=[aime24]",
                                                 f"task.out_dir={tmp_path / 'out'}"], tmp_path / "run3"))
    assert changed["test/math/aime24/generated"] == 2              # other settings → other cache file


@pytest.mark.skipif(not bfcl_available(), reason="bfcl-eval not installed (scripts/install_bfcl.sh); it scores BFCL")
def test_bfcl_end_to_end_ast_categories_and_resume(hydra_configs, tmp_path):
    from tirl.evaluate import run

    overrides = TINY + ["task=bfcl", "task.categories=[simple,java,irrelevance]", f"task.source={FIXTURES}",
                        "task.limit=3", "task.batch_size=3", f"task.out_dir={tmp_path / 'out'}"]
    metrics = run(eval_config(overrides, tmp_path / "run1"))
    assert metrics["test/bfcl/simple_python/total"] == 3 and metrics["test/bfcl/simple_java/total"] == 1
    assert metrics["test/bfcl/irrelevance/total"] == 2
    assert metrics["test/bfcl/summary/generated"] == 6
    assert "test/bfcl/summary/lazy_ratio/irrelevance" in metrics
    assert "test/bfcl/summary/lazy_ratio/parallel" not in metrics   # no parallel category ran
    out = tmp_path / "out"
    assert (out / "bfcl" / "score" / "non_live" / "BFCL_v4_simple_python_score.json").is_file()
    cached = (out / "bfcl" / "result" / "BFCL_v4_simple_python_result.json").read_text().splitlines()
    assert len(cached) == 3
    again = run(eval_config(overrides, tmp_path / "run2"))
    assert again["test/bfcl/summary/generated"] == 0
    assert again["test/bfcl/summary/overall"] == metrics["test/bfcl/summary/overall"]
    assert len((out / "bfcl" / "result" / "BFCL_v4_simple_python_result.json").read_text().splitlines()) == 3


def test_toolcall_error_kinds_by_hand():
    from tirl.benchmarks.toolcall_errors import KINDS, prompt_group, think_restates_request, toolcall_error

    gold = [{"get_weather": {"city": ["Paris"], "units": ["", "celsius"]}}]
    request = "Get the weather in Paris."
    think = "<think>\nThe request has 1 sub-task.\n1. Get the weather in Paris: get_weather.\n</think>\n\n"
    bad_think = "<think>\nThe request has 1 sub-task.\n1. Get the weather in Rome: get_weather.\n</think>\n\n"
    cases = {
        think + '[get_weather(city="Paris")]': "ok",
        think + '[get_weather(city="Rome")]': "values_think_ok",        # the copy into the call went wrong
        bad_think + '[get_weather(city="Rome")]': "values_think_bad",   # already wrong in the reasoning
        think + '[get_time(tz="CET")]': "names",
        think + '[get_weather(city="Paris"), get_weather(city="Rome")]': "n_calls",
        think + '[get_weather(city="Par': "unparsable",
        think + "None of the given functions can help with this request.": "declined",
        "<think>\nThe request has 1 sub": "no_answer",
    }
    for response, kind in cases.items():
        assert toolcall_error(response, gold, request) == kind, response
    assert set(cases.values()) | {"called_irrelevant"} == set(KINDS)
    # no call expected: a refusal is right, a call BFCL decodes (positional too) or a <tool_call> block is not;
    # a fragment BFCL cannot decode is no call, as its checker says
    assert toolcall_error(think + "I cannot do that.", [], "Tell me a joke.") == "ok"
    assert toolcall_error(think + '[get_weather(city="Paris")]', [], "Tell me a joke.") == "called_irrelevant"
    assert toolcall_error(think + 'get_weather("Paris")', [], "Tell me a joke.") == "called_irrelevant"
    assert toolcall_error(think + '<tool_call>{"name": "f"}</tool_call>', [], "Hi.") == "called_irrelevant"
    assert toolcall_error(think + "[get_weather(", [], "Tell me a joke.") == "ok"
    assert toolcall_error(think + "I cannot do that.", [], "Hi.", category="live_relevance") == "declined"
    assert not think_restates_request("no numbered lines here", request)
    assert think_restates_request("1. Get the weather in Paris.", request)    # without the function name too
    assert think_restates_request("1. Get the weather in Paris: get_time, not given.", request)
    record = {"category": "irrelevance", "tools": [{"name": "get_time"}],
              "messages": [{"role": "user", "content": "Get the weather in Paris."}]}
    assert prompt_group(record) == "irrelevance/missing_function (1 offered)"
    record["messages"][-1]["content"] = "Tell me a joke."
    assert prompt_group(record) == "irrelevance/small_talk (1 offered)"
