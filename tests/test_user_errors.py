"""Errors a user can cause end in one sentence naming the key to change, before any model loads, no traceback.

Most checks are called directly (fast); a few real entry-point runs (subprocesses, HYDRA_FULL_ERROR unset) confirm
what a user sees: exit status 2 and exactly one line on stderr.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tirl.config import CONFIG_DIR, ConfigError, check_overrides, exit_on_config_error, task_wrapper, validate
from tirl.data.datamodules import heldout_count
from tirl.data.sources import DataError
from tirl.errors import UserError
from tirl.train import check_run_can_start

REPO = CONFIG_DIR.parent
FIXTURES = Path(__file__).parent / "fixtures"
SMALL_MATH = FIXTURES / "math_prompts_10.jsonl"   # ten hand-written math prompts


def one_sentence(message: str, *needles: str) -> None:
    assert "\n" not in message and message.endswith((".", "?")), message
    for needle in needles:
        assert needle in message, (needle, message)


def preflight(train_cfg, *overrides: str) -> None:
    cfg = train_cfg(*overrides)
    check_run_can_start(cfg, validate(cfg))


# ------------------------------------------------------------------ method, data, paths, backend at start


@pytest.mark.parametrize("overrides,needles", [
    (["method=sft"], ["method=sft", "data=sft_jsonl data.train=<file>", "data=sft_synthetic_math",
                      "data=sft_synthetic_toolcall"]),
    (["data=sft_synthetic_math"], ["method=thor", "RL", "data=jsonl data.train=<file>", "data=synthetic_math"]),
    (["method=dcore", "method.reward.name=toolcall"],   # a reward the method names must fit the data's task
     ["method=dcore", "data.train=synthetic:math", "data=synthetic_toolcall", "method=thor"]),
    (["data=synthetic_toolcall"], ["method=thor", "math answers", "data=synthetic_math", "method=dcore"]),
    (["method=grpo", "data=bfcl", "data.train=synthetic:math"], ["data.train=synthetic:math", "data.task=toolcall"]),
    (["data=jsonl", "data.train=no/such/prompts.jsonl"], ["data.train=no/such/prompts.jsonl", "does not exist"]),
    (["data=jsonl", f"data.train={SMALL_MATH}", "data.val=missing_val.jsonl"], ["data.val=missing_val.jsonl"]),
    (["init_from=no/such/run.ckpt"], ["init_from=no/such/run.ckpt", "does not exist", "init_from=null"]),
    ([f"init_from={FIXTURES}"], [f"init_from={FIXTURES}", "without config.json"]),
    ([f"init_from={SMALL_MATH}"], ["not a .ckpt"]),
    (["ckpt_path=no/such/last.ckpt"], ["ckpt_path=no/such/last.ckpt", "ckpt_path=null"]),
])
def test_a_run_that_cannot_work_fails_at_start_naming_the_key_to_change(train_cfg, overrides, needles):
    with pytest.raises(ConfigError) as err:
        preflight(train_cfg, *overrides)
    one_sentence(str(err.value), *needles)
    assert "model.name_or_path" not in str(err.value)   # init_from's problems name init_from


@pytest.mark.parametrize("overrides", [
    [], ["method=sft", "data=sft_synthetic_math"], ["method=dcore", "data=synthetic_toolcall"], ["method=dcore"],
    ["method=dcore", "data=bfcl", "data.train=synthetic:toolcall"], ["data=jsonl", f"data.train={SMALL_MATH}"], ["ckpt_path=last"],
])
def test_runs_that_fit_together_pass_the_start_checks(train_cfg, overrides):
    preflight(train_cfg, *overrides)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_preset_pairs_its_method_with_fitting_data(train_cfg, preset):
    from tirl.config.preflight import check_method_data

    cfg = train_cfg(f"experiment={preset}", f"data.train={SMALL_MATH}")   # presets on files need data.train
    check_method_data(validate(cfg), CONFIG_DIR)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine could run vLLM")
def test_vllm_rollouts_where_none_can_run_fail_at_start(train_cfg):
    from tirl.pipelines.chat_backends import ChatConfigError, check_chat_backend
    from tirl.rollout.vllm import VLLMUnavailableError

    with pytest.raises(VLLMUnavailableError) as err:
        preflight(train_cfg, "rollout=vllm")
    one_sentence(str(err.value), "rollout=vllm", "rollout=hf")
    preflight(train_cfg, "rollout=vllm", "method=sft", "data=sft_synthetic_math")   # SFT does not roll out
    with pytest.raises(VLLMUnavailableError) as err:   # the pipelines' chat backends: the same one check
        check_chat_backend({"kind": "vllm", "model": "x"}, "critic")
    one_sentence(str(err.value), "backend@backends.critic=vllm", "backend@backends.critic=hf")
    with pytest.raises(ChatConfigError) as err:
        check_chat_backend({"kind": "vlm"}, "actor")
    one_sentence(str(err.value), "'vlm'", "backend@backends.actor")


@pytest.mark.parametrize("override,needles", [
    ("method.group_size=1", ["'method.group_size'", "at least 2"]),
    ("method.lr=0", ["'method.lr'", "above 0"]),
    ("rollout.top_p=1.5", ["'rollout.top_p'", "at most 1"]),
    ("data.val_size=-1", ["'data.val_size'", "at least 0"]),
    ("sandbox.timeout_s=0", ["'sandbox.timeout_s'"]),
])
def test_values_out_of_range_name_key_and_range(train_cfg, override, needles):
    with pytest.raises(ConfigError) as err:
        validate(train_cfg(override))
    one_sentence(str(err.value), *needles)


def test_eval_checks_every_benchmark_source_before_generating(tmp_path):
    from tirl.benchmarks.math_bench import BenchmarkError
    from tirl.benchmarks.task_config import BFCLTaskConfig, MathTaskConfig, check_eval_sources

    (tmp_path / "math500.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    check_eval_sources(MathTaskConfig(bench=["math500"], bench_dir=str(tmp_path)))
    with pytest.raises(BenchmarkError) as err:   # the second benchmark is missing: fail before the first runs
        check_eval_sources(MathTaskConfig(bench=["math500", "aime24"], bench_dir=str(tmp_path)))
    one_sentence(str(err.value), "aime24.jsonl", "task.bench_paths.aime24=<file>")
    with pytest.raises(BenchmarkError) as err:
        check_eval_sources(MathTaskConfig(bench=["math500"], bench_paths={"math500": str(tmp_path / "x.jsonl")}))
    one_sentence(str(err.value), "task.bench_paths.math500")
    with pytest.raises(ConfigError) as err:
        check_eval_sources(BFCLTaskConfig(source=str(tmp_path / "nope")))
    one_sentence(str(err.value), "task.source=")


# ------------------------------------------------------------------ command line: keys, advice, --help


@pytest.mark.parametrize("config,argv,needles", [
    ("train", ["trainer.max_stepz=5"], ["'trainer.max_stepz'", "did you mean 'max_steps'?"]),
    ("train", ["init_form=run.ckpt"], ["'init_form'", "did you mean 'init_from'?"]),
    ("train", ["callbacks.model_checkpoint.monitr=val/acc"], ["did you mean 'monitor'?"]),
    ("eval", ["task=math", "task.n_sampels=4"], ["'task.n_sampels'", "did you mean 'n_samples'?"]),
    ("eval", ["task=bfcl", "task.categoris=[simple]"], ["did you mean 'categories'?"]),
    ("eval", ["devise=cpu"], ["did you mean 'device'?"]),
])
def test_key_typos_anywhere_get_the_closest_key_not_plus_advice(config, argv, needles):
    with pytest.raises(ConfigError) as err:
        check_overrides(argv, CONFIG_DIR, config)
    one_sentence(str(err.value), *needles)
    assert "+" not in str(err.value)


def test_valid_keys_absent_from_the_yaml_need_no_plus():
    argv = ["trainer.gradient_clip_val=1.0", "trainer.max_steps=3", "method.reward.kwargs.strict=true", "seed=1"]
    assert check_overrides(argv, CONFIG_DIR, "train") == [
        "++trainer.gradient_clip_val=1.0", "trainer.max_steps=3", "++method.reward.kwargs.strict=true", "seed=1"]
    assert check_overrides(["task=math", "task.bench_paths.math500=m.jsonl", "task.limit=3"], CONFIG_DIR, "eval") == [
        "task=math", "++task.bench_paths.math500=m.jsonl", "task.limit=3"]


def test_bench_paths_without_plus_reaches_the_eval_config():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    argv = check_overrides(["task.bench_paths.math500=m.jsonl"], CONFIG_DIR, "eval")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=argv)
    assert cfg.task.bench_paths.math500 == "m.jsonl"


# ------------------------------------------------------------------ how the sentence is shown


def test_a_user_error_prints_one_line_and_exits_2_unless_full_error(monkeypatch, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info, exit_on_config_error():
        raise DataError("prompts.jsonl, line 3: not JSON; fix or remove that line.")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "Error: prompts.jsonl, line 3: not JSON; fix or remove that line.\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(SystemExit), exit_on_config_error():
        raise DataError("bad line.")
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("Error: bad line.\n")
    with pytest.raises(RuntimeError), exit_on_config_error():   # a bug is not a user error: it propagates
        raise RuntimeError("bug")


def test_the_job_log_keeps_a_user_error_without_a_traceback(tmp_path):
    handler = logging.FileHandler(tmp_path / "job.log")
    logging.getLogger().addHandler(handler)
    try:
        @task_wrapper
        def task(cfg):
            raise DataError("data.train holds no prompts; check data.train.")

        with pytest.raises(UserError):
            task({})
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = (tmp_path / "job.log").read_text()
    assert "data.train holds no prompts" in text and "Traceback" not in text


def run_entry(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_train_with_sft_method_on_rl_data_says_which_data_to_pick(tmp_path):
    proc = run_entry(str(REPO / "src/train.py"), "method=sft", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    one_sentence(proc.stderr.strip(), "Config error: method=sft", "data=sft_jsonl", "data=sft_synthetic_math")
    assert "Instantiating" not in proc.stdout   # stopped before the tokenizer, datamodule and model


def test_eval_with_a_missing_benchmark_file_stops_before_generating(tmp_path):
    (tmp_path / "math500.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    proc = run_entry(str(REPO / "src/eval.py"), "task=math", f"task.bench_dir={tmp_path}", "bench=[math500,aime24]",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    one_sentence(proc.stderr.strip(), "aime24")
    assert not (tmp_path / "run" / "generations").exists()


def test_help_does_not_offer_the_schema_as_a_choice():
    proc = run_entry("src/train.py", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "method: dapo, dcore" in proc.stdout and "_schema" not in proc.stdout


# ------------------------------------------------------------------ small files


def test_heldout_count_caps_validation_at_a_fifth_of_the_file():
    assert [heldout_count(n, 64) for n in (3, 5, 10, 24, 320, 1000)] == [0, 1, 2, 4, 64, 64]
    assert heldout_count(24, 4) == 4 and heldout_count(13, 2) == 2   # explicit small values are kept


def test_a_ten_record_file_trains_with_the_default_data_settings(train_cfg, tmp_path):
    from tirl.train import run

    cfg = train_cfg("data=jsonl", f"data.train={SMALL_MATH}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                    "method.group_size=2", "method.rollout_batch_size=2", "method.val_samples=1",
                    "rollout.max_new_tokens=16", "rollout.max_total_tokens=32", "rollout.max_tool_rounds=1",
                    "method.step_level.enabled=false", "test=false")
    assert cfg.data.val_size == 64   # the default, larger than the file
    value = run(cfg)
    assert value is not None and 0.0 <= value <= 1.0   # val/acc over the 2 held-out prompts
    rows = (tmp_path / "csv").rglob("metrics.csv")
    assert any("train/" in p.read_text() for p in rows)


def test_a_file_too_small_to_hold_out_trains_and_ends_without_an_error(train_cfg, tmp_path):
    """Under 5 records nothing is held out: the run trains, saves, and returns no metric (it used to fail at the
    end with "optimized_metric 'val/acc' was never logged" after training had finished)."""
    from tirl.train import run

    four = tmp_path / "four.jsonl"
    four.write_text("".join(SMALL_MATH.read_text().splitlines(keepends=True)[:4]))
    cfg = train_cfg("data=jsonl", f"data.train={four}", "trainer.max_steps=1", "method.group_size=2",
                    "method.rollout_batch_size=2", "rollout.max_new_tokens=16", "rollout.max_total_tokens=32",
                    "rollout.max_tool_rounds=1", "method.step_level.enabled=false", "test=false")
    assert run(cfg) is None
    assert list(tmp_path.rglob("last.ckpt"))


def test_a_misnamed_optimized_metric_is_still_an_error_when_validation_ran():
    from tirl.train import metric_value

    assert metric_value({"val/acc": 0.5, "train/loss": 1.0}, "val/acc") == 0.5
    assert metric_value({"train/loss": 1.0}, "val/acc") is None            # no validation ran at all
    with pytest.raises(ConfigError, match="'val/accuracy' was never logged.*val/acc"):
        metric_value({"val/acc": 0.5}, "val/accuracy")
    with pytest.raises(ConfigError, match="'train/los' was never logged"):
        metric_value({"train/loss": 1.0}, "train/los")


def test_a_prompt_of_another_task_than_the_runs_reward_is_refused():
    """One reward per run (the first record's task picks it): a tool-call prompt in a math run, or the reverse,
    would be scored 0 by the wrong reward without a word. The README's own mixed file shows it."""
    import json

    from tirl.data.sources import DataError
    from tirl.modules.grpo import check_records_task

    mixed = [json.loads(line) for line in (FIXTURES / "own_data" / "rl.jsonl").read_text().splitlines()]
    assert [r["task"] for r in mixed] == ["math", "toolcall", "toolcall"]
    with pytest.raises(DataError, match=r"Prompt 't1' has task 'toolcall', but this run's reward 'math' scores math"):
        check_records_task(mixed, "math")
    with pytest.raises(DataError, match=r"Prompt 'm1' has task 'math', but this run's reward 'toolcall_exact'"):
        check_records_task(mixed, "toolcall_exact")
    check_records_task(mixed[1:], "toolcall")                  # one task: fine
    check_records_task([{"id": "x", "answer": "1"}], "math")   # no task field: the run's task
    check_records_task(mixed, "repetition_free_custom")       # a reward of no known task: not checked
