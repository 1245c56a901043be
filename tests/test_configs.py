"""The config tree composes, resolves and validates in every combination; user mistakes end in one sentence."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tirl.config import CONFIG_DIR, ConfigError, check_overrides, check_trainer_keys, runnable, validate
from tirl.config.overrides import group_options
from tirl.config.schema import LoraConfig, LossConfig, MethodConfig
from tirl.config.validate import SCHEMAS, check_key_path

MODELS = {  # option → the checkpoint it must name
    "tiny": "tiny-warm",
    "tiny_scratch": "tiny",
    "qwen3_0.6b": "Qwen/Qwen3-0.6B",
    "qwen8b": "Qwen/Qwen3-8B",
    "qwen14b": "Qwen/Qwen3-14B",
    "qwen2.5_math_7b": "Qwen/Qwen2.5-Math-7B",
    "llama3.1_8b": "meta-llama/Llama-3.1-8B-Instruct",
}
METHODS = ["sft", "grpo", "dr_grpo", "dapo", "dcore", "thor"]
HARDWARE = {"cpu": "cpu", "gpu": "gpu", "ddp": "gpu", "fsdp": "gpu", "multinode": "gpu"}


@pytest.fixture(scope="module", autouse=True)
def hydra_configs():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def compose_resolved(overrides: list[str], config_name: str = "train", output_dir: str = "/tmp/tirl-test-out") -> DictConfig:
    """Compose like `python src/{config_name}.py <overrides>` and resolve every interpolation."""
    cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    return runnable(cfg, output_dir)


def test_config_groups_hold_the_options_the_readme_names():
    assert set(group_options(CONFIG_DIR, "model")) == set(MODELS)
    assert set(group_options(CONFIG_DIR, "method")) == set(METHODS)
    assert set(group_options(CONFIG_DIR, "hardware")) == set(HARDWARE)
    assert {"synthetic_math", "synthetic_toolcall", "sft_synthetic_math", "sft_synthetic_toolcall", "jsonl", "bfcl"} <= set(
        group_options(CONFIG_DIR, "data")
    )


@pytest.mark.parametrize("model,method,hardware", list(itertools.product(MODELS, METHODS, HARDWARE)))
def test_every_model_method_hardware_combination_validates(model, method, hardware):
    cfg = compose_resolved([f"model={model}", f"method={method}", f"hardware={hardware}"])
    typed = validate(cfg)
    assert typed.model.name_or_path == MODELS[model]
    assert typed.method.name == method
    assert cfg.trainer.accelerator == HARDWARE[hardware]
    # RL datamodules batch rollout_batch_size prompts; the interpolation must have resolved to a number
    assert isinstance(typed.data.batch_size, int) and typed.data.batch_size > 0
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.callbacks.model_checkpoint.monitor == cfg.optimized_metric == ("val/loss" if method == "sft" else "val/acc")
    assert Path(cfg.paths.log_dir).name == "logs"


def test_scale_is_chosen_by_the_model_or_explicitly_and_wins_over_the_method():
    tiny = validate(compose_resolved(["method=thor", "model=tiny"])).method
    real = validate(compose_resolved(["method=thor", "model=qwen8b"])).method
    assert (tiny.lr, tiny.group_size, tiny.rollout_batch_size) == (1e-4, 8, 8) and (real.lr, real.group_size) == (1e-6, 16)
    assert tiny.loss.clip_high == real.loss.clip_high == 0.28          # the algorithm is THOR's either way
    assert (tiny.step_level.weight, real.step_level.weight) == (0.1, 1.0)   # L_step weighed by its token share at tiny scale
    # scale= picks one against the model's choice: the paper's values on the tiny model, the tiny budget on Qwen3-8B
    assert validate(compose_resolved(["model=tiny", "scale=paper"])).method.lr == 1e-6
    assert validate(compose_resolved(["model=qwen8b", "scale=tiny"])).method.lr == 1e-4
    assert validate(compose_resolved(["model=tiny_scratch"])).method.lr == 1e-4
    # the scale's values win over the rollout/data group yamls too (they come after every group)
    cfg = validate(compose_resolved(["experiment=thor_tiny"]))
    assert (cfg.method.lr_schedule, cfg.data.val_size, cfg.rollout.max_total_tokens) == ("cosine", 64, 256)
    assert validate(compose_resolved(["model=tiny", "method.lr=0.01"])).method.lr == 0.01   # the command line wins


# What the README's commands train with. A change to any of these — in a method preset, scale/, an experiment or the
# schema — must be deliberate: update the figure here with it. (lr, G, prompts per step, lengths, steps, clip, KL,
# reward, the update schedule (issue 18: the papers' rounds and mini-batches), the parts of each method.)
PINNED = {
    (): dict(  # python src/train.py: THOR at the tiny scale
        lr=1e-4, lr_schedule="cosine", group_size=8, rollout_batch_size=8, micro_batch_size=32, clip=(0.2, 0.28, 3.0),
        schedule=(None, 1, "rollout", "tokens"), filter=(8, 2, True), step_cut=(16, 4),
        kl=(0.0, "k3"), nll_coef=0.01, agg="token-mean", reward="math", task="math", shaping="none",
        step_level=(True, 4, 0.1), episode_filter=True, rollout=(640, 128, 256, 2, 1.0), steps=(60, 10)),
    ("method=thor", "model=qwen8b"): dict(  # the paper's THOR values, no experiment
        lr=1e-6, lr_schedule="constant", group_size=16, rollout_batch_size=5120, micro_batch_size=8, clip=(0.2, 0.28, 3.0),
        schedule=(128, 1, "recompute", "positive"), filter=(150, 8, True), step_cut=(100, 16),
        kl=(0.0, "k3"), nll_coef=0.01, agg="token-mean", reward="math", task="math", shaping="none",
        step_level=(True, 16, 1.0), episode_filter=True, rollout=(512, 256, 1024, 5, 1.0), steps=(400, 40)),
    ("experiment=dcore_tiny",): dict(
        lr=2e-4, lr_schedule="cosine", group_size=8, rollout_batch_size=16, micro_batch_size=32, clip=(0.2, 0.2, None),
        schedule=(None, 1, "rollout", "tokens"), filter=(8, 2, False), step_cut=(16, 4),
        kl=(0.001, "k3"), nll_coef=0.0, agg="token-mean", reward="toolcall", task="toolcall", shaping="da_grpo",
        step_level=(False, 4, 0.1), episode_filter=False, rollout=(640, 160, 160, 0, 1.0), steps=(180, 20)),
    ("experiment=thor_qwen8b", "data.train=x.jsonl"): dict(
        lr=1e-6, lr_schedule="constant", group_size=16, rollout_batch_size=5120, micro_batch_size=2, clip=(0.2, 0.28, 3.0),
        schedule=(128, 1, "recompute", "positive"), filter=(150, 8, True), step_cut=(100, 16),
        kl=(0.0, "k3"), nll_coef=0.01, agg="token-mean", reward="math", task="math", shaping="none",
        step_level=(True, 16, 1.0), episode_filter=True, rollout=(1024, 4096, 16384, 5, 1.0), steps=(400, 40)),
    ("experiment=dcore_qwen8b", "data.train=x.jsonl"): dict(
        lr=1e-6, lr_schedule="constant", group_size=8, rollout_batch_size=32, micro_batch_size=4, clip=(0.2, 0.2, None),
        schedule=(8, 1, "recompute", "tokens"), filter=(8, 2, False), step_cut=(16, 8),
        kl=(0.001, "k3"), nll_coef=0.0, agg="token-mean", reward="toolcall", task="toolcall", shaping="da_grpo",
        step_level=(False, 8, 1.0), episode_filter=False, rollout=(8192, 4096, 4096, 0, 1.0), steps=(300, 20)),
}


@pytest.mark.parametrize("overrides", list(PINNED), ids=lambda o: " ".join(o) or "default")
def test_the_readme_commands_train_with_these_values(overrides):
    cfg = compose_resolved(list(overrides))
    typed = validate(cfg)
    m, r = typed.method, typed.rollout
    got = dict(
        lr=m.lr, lr_schedule=m.lr_schedule, group_size=m.group_size, rollout_batch_size=m.rollout_batch_size,
        micro_batch_size=m.micro_batch_size, clip=(m.loss.clip_low, m.loss.clip_high, m.loss.dual_clip),
        schedule=(m.mini_batch_size, m.ppo_epochs, m.old_log_probs, m.loss.nll_norm),
        filter=(m.episode_filter.min_response_tokens, m.episode_filter.min_group_survivors,
                m.episode_filter.drop_zero_variance),
        step_cut=(m.step_level.suffix_tokens, m.step_level.group_size),
        kl=(m.loss.kl_coef, m.loss.kl_kind), nll_coef=m.loss.nll_coef, agg=m.loss.agg, reward=m.reward.name,
        task=typed.data.task, shaping=m.shaping.kind,
        step_level=(m.step_level.enabled, m.step_level.group_size, m.step_level.weight),
        episode_filter=m.episode_filter.enabled,
        rollout=(r.max_prompt_tokens, r.max_new_tokens, r.max_total_tokens, r.max_tool_rounds, r.temperature),
        steps=(cfg.trainer.max_steps, cfg.trainer.val_check_interval),
    )
    assert got == PINNED[overrides]
    assert typed.data.batch_size == m.rollout_batch_size   # the RL datamodule batches one step's prompts


@pytest.mark.parametrize("overrides, metric, mode", [
    (["method=sft", "data=sft_synthetic_toolcall"], "val/loss", "min"),   # SFT logs no accuracy to select on
    (["experiment=sft_tiny_math"], "val/loss", "min"),
    (["experiment=dcore_tiny"], "val/acc", "max"),
    ([], "val/acc", "max"),
    (["method=sft", "data=sft_synthetic_math", "optimized_metric=train/loss"], "train/loss", "min"),
])
def test_optimized_metric_and_checkpoint_mode_follow_the_method(overrides, metric, mode):
    cfg = compose_resolved(overrides)
    assert (cfg.optimized_metric, cfg.callbacks.model_checkpoint.monitor) == (metric, metric)
    assert cfg.callbacks.model_checkpoint.mode == mode


def test_method_presets_carry_the_papers_values():
    dcore = validate(compose_resolved(["method=dcore", "model=qwen8b"])).method
    assert dcore.module["_target_"] == "tirl.modules.dcore.DCoreModule"
    assert (dcore.shaping.kind, dcore.shaping.alpha, dcore.shaping.delta) == ("da_grpo", 0.1, 0.5)
    assert (dcore.loss.clip_low, dcore.loss.clip_high, dcore.loss.agg) == (0.2, 0.2, "token-mean")
    assert (dcore.loss.kl_kind, dcore.loss.kl_coef, dcore.group_size, dcore.lr) == ("k3", 0.001, 8, 1e-6)
    assert dcore.reward.name == "math"   # the default data is math: the reward is the task's, D-CORE's on toolcall data

    thor_cfg = compose_resolved(["method=thor", "model=qwen8b"])
    thor = validate(thor_cfg).method
    assert thor.module["_target_"] == "tirl.modules.thor.ThorModule"
    assert (thor.loss.clip_low, thor.loss.clip_high, thor.loss.dual_clip) == (0.2, 0.28, 3.0)
    assert (thor.loss.kl_coef, thor.loss.nll_coef, thor.group_size, thor.lr) == (0.0, 0.01, 16, 1e-6)
    assert thor.episode_filter.enabled and thor.step_level.enabled and thor.reward.name == "math"
    assert thor_cfg.rollout.max_tool_rounds == 5 and thor_cfg.rollout.temperature == 1.0

    dr = validate(compose_resolved(["method=dr_grpo", "model=qwen8b"])).method
    assert (dr.advantage.scale, dr.loss.agg) == ("none", "seq-mean-token-sum-norm")
    dapo = validate(compose_resolved(["method=dapo", "model=qwen8b"])).method
    assert (dapo.loss.clip_high, dapo.episode_filter.dynamic_sampling) == (0.28, True)
    sft = validate(compose_resolved(["method=sft", "data=sft_synthetic_math", "model=qwen8b"])).method
    assert (sft.kind, sft.module["_target_"], sft.lr) == ("sft", "tirl.modules.sft.SFTModule", 1e-5)


def test_validate_returns_schema_dataclasses_with_defaults_filled_in():
    typed = validate(compose_resolved(["method=thor", "model.lora.enabled=true", "model.lora.r=8", "seed=7"]))
    assert isinstance(typed.method, MethodConfig) and isinstance(typed.method.loss, LossConfig)
    assert typed.method.loss.kl_kind == "k3"  # not in thor.yaml: the schema default
    assert typed.model.lora == LoraConfig(enabled=True, r=8)
    assert typed.data.seed == 7  # data.seed interpolates the top-level seed
    assert typed.data.batch_size == typed.method.rollout_batch_size


@pytest.mark.parametrize("preset", group_options(CONFIG_DIR, "experiment"))
def test_every_experiment_preset_validates(preset):
    cfg = compose(config_name="train", overrides=[f"experiment={preset}"])
    extra = ["data.train=prompts.jsonl"] if cfg.data.train is None else []   # real-data presets name no file
    cfg = compose_resolved([f"experiment={preset}", *extra])
    typed = validate(cfg)
    assert cfg.task_name == preset
    assert typed.method.name == preset.split("_")[0]  # presets are named <method>_<model...>
    assert typed.model.name_or_path in MODELS.values()


def test_experiment_presets_pick_their_model_and_hardware():
    cfg = compose_resolved(["experiment=thor_qwen8b", "data.train=x.jsonl"])
    assert (cfg.model.name_or_path, cfg.rollout.backend, cfg.trainer.strategy._target_) == (
        "Qwen/Qwen3-8B", "vllm", "tirl.models.sharding.FSDP2Strategy")
    assert (cfg.model.fsdp.param_dtype, cfg.model.gradient_checkpointing, cfg.trainer.precision) == (
        "bfloat16", True, "32-true")   # fp32 master shards, bf16 compute by FSDP2's policy, not Lightning's autocast
    assert validate(compose_resolved(["experiment=dcore_qwen14b", "data.train=x.jsonl"])).model.name_or_path == "Qwen/Qwen3-14B"
    tiny = compose_resolved(["experiment=dcore_tiny"])
    assert (tiny.model.name_or_path, tiny.trainer.accelerator, tiny.data.train) == ("tiny-warm", "cpu", "synthetic:toolcall")


@pytest.mark.parametrize("search", group_options(CONFIG_DIR, "hparams_search"))
def test_hparams_search_presets_sweep_real_schema_keys(search):
    cfg = compose(config_name="train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    params = cfg.hydra.sweeper.params
    assert len(params) == 2
    for key in params:  # a misspelled sweep key would only fail after the first trial
        group, *path = key.split(".")
        check_key_path(path, SCHEMAS[group], group)


@pytest.mark.parametrize("preset,key,value", [("fdr", "fast_dev_run", True), ("limit", "limit_val_batches", 2),
                                               ("overfit", "overfit_batches", 1), ("default", "detect_anomaly", True)])
def test_debug_presets_compose_on_the_cpu(preset, key, value):
    cfg = compose_resolved([f"debug={preset}", "experiment=thor_qwen8b", "data.train=x.jsonl"])  # debug wins
    validate(cfg)
    assert cfg.trainer[key] == value and cfg.trainer.accelerator == "cpu" and cfg.task_name == "debug"


@pytest.mark.parametrize("task", ["math", "bfcl"])
def test_eval_config_validates(task):
    from tirl.benchmarks.task_config import validate_eval

    cfg = compose_resolved([f"task={task}", "model=qwen8b", "rollout.self_correction.enabled=true"], config_name="eval")
    typed, typed_task = validate_eval(cfg)
    assert typed.model.name_or_path == "Qwen/Qwen3-8B" and typed.rollout.self_correction.enabled
    assert typed_task.name == task and cfg.task_name == f"eval_{task}"
    assert typed.rollout.max_new_tokens == 1024   # eval.yaml's budgets win over the rollout group's


# ------------------------------------------------------------------ user mistakes → one sentence


def assert_one_sentence(message: str, *needles: str) -> None:
    assert "\n" not in message and message.endswith("."), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_misspelled_nested_key_names_path_and_closest_key():
    cfg = compose_resolved(["+method.loss.clip_hgih=0.3"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert_one_sentence(str(err.value), "'method.loss.clip_hgih'", "did you mean 'clip_high'?", "clip_low", "kl_kind")


def test_misspelled_top_level_key_is_caught():
    with pytest.raises(ConfigError) as err:
        validate(compose_resolved(["+sed=3"]))
    assert_one_sentence(str(err.value), "'sed'", "did you mean 'seed'?")


def test_wrong_type_names_key_and_expected_type():
    # the yaml extends the typed schema, so the command line is checked before Hydra composes anything
    with pytest.raises(ConfigError) as err:
        check_overrides(["method.lr=fast"], CONFIG_DIR)
    assert_one_sentence(str(err.value), "'method.lr'", "'fast'", "float")
    with pytest.raises(ConfigError):
        check_overrides(["method.group_size=8,many"], CONFIG_DIR)
    check_overrides(["method.lr=1e-5,3e-5", "model.lora.enabled=true"], CONFIG_DIR)


@pytest.mark.parametrize("override,key,choice", [
    ("method.loss.agg=token-sum", "method.loss.agg", "seq-mean-token-sum-norm"),
    ("method.advantage.scale=std", "method.advantage.scale", "none"),
    ("++method.loss.kl_kind=k4", "method.loss.kl_kind", "k3"),
    ("rollout.backend=sglang", "rollout.backend", "vllm"),
    ("sandbox.kind=docker", "sandbox.kind", "fusion"),
    ("model.dtype=fp8", "model.dtype", "bfloat16"),
])
def test_invalid_enum_value_lists_choices(override, key, choice):
    with pytest.raises(ConfigError) as err:
        validate(compose_resolved([override]))
    assert_one_sentence(str(err.value), f"'{key}'", "valid choices", choice)


def test_required_value_left_missing_says_how_to_set_it():
    with pytest.raises(ConfigError) as err:
        validate(compose_resolved(["data=jsonl"]))
    assert_one_sentence(str(err.value), "'data.train'", "data.train=<value>")
    with pytest.raises(ConfigError) as err:
        validate(compose_resolved(["sandbox=fusion"]))
    assert_one_sentence(str(err.value), "'sandbox.url'")
    assert validate(compose_resolved(["sandbox=fusion", "sandbox.url=http://localhost:8080"])).sandbox.kind == "fusion"


@pytest.mark.parametrize("argv,needles", [
    (["method=thorr"], ["'thorr'", "'method'", "did you mean 'thor'?", "dapo, dcore, dr_grpo, grpo, sft, thor"]),
    (["model=qwen8b", "hardware=fdsp"], ["'fdsp'", "did you mean 'fsdp'?", "multinode"]),
    (["-m", "method=thor,dcorre"], ["'dcorre'", "did you mean 'dcore'?"]),
    (["+experiment=thor_tinyy"], ["'thor_tinyy'", "'experiment'", "dcore_qwen14b"]),
    (["model.dtyp=bfloat16"], ["'model.dtyp'", "did you mean 'dtype'?"]),
    (["method.shaping.alpah=0.2"], ["'method.shaping.alpah'", "did you mean 'alpha'?"]),
    (["hardware=fsdp", "model.fsdp.param_dtyp=float32"], ["'model.fsdp.param_dtyp'", "did you mean 'param_dtype'?"]),
])
def test_command_line_typos_are_named_before_hydra_runs(argv, needles):
    with pytest.raises(ConfigError) as err:
        check_overrides(argv, CONFIG_DIR)
    assert_one_sentence(str(err.value), *needles)


def test_valid_command_lines_pass_the_override_check():
    check_overrides(["method=thor,dcore", "model=qwen8b", "experiment=thor_tiny", "~logger", "logger=null",
                     "hydra.run.dir=/tmp/x", "--cfg", "job", "method.shaping.alpha=0.2", "data.train=a.jsonl",
                     "method.module._target_=my.Module", "method.reward.kwargs.strict=true", "trainer.max_steps=3",
                     "method.loss.nll_coef=choice(0.0,0.01)", "hparams_search=dcore_alpha_delta"], CONFIG_DIR)


def test_misspelled_trainer_argument_is_named():
    cfg = compose_resolved(["+trainer.max_step=3"])
    with pytest.raises(ConfigError) as err:
        check_trainer_keys(cfg.trainer)
    assert_one_sentence(str(err.value), "'trainer.max_step'", "did you mean 'max_steps'?")
    check_trainer_keys(compose_resolved(["hardware=fsdp"]).trainer)


