"""Where config values come from: the provenance record matches what Hydra composed, presets say only what they
change, the reward follows the data's task, choices follow the registries, and every group is typed."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tirl.config import CONFIG_DIR, ConfigError, validate
from tirl.config.overrides import group_options
from tirl.config.provenance import COMMAND_LINE, SCHEMA, overridden, provenance, record_provenance
from tirl.config.validate import OPTION_SCHEMAS, SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["method=thor", "model=qwen8b"], ["experiment=dcore_tiny"], ["experiment=thor_qwen8b"],
            ["debug=default", "method=dapo", "method.lr=3e-4", "~test", "+tags=[a,b]"]]


def composed(overrides: list[str], config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def leaves(node, prefix=""):
    for key in node:
        child = node._get_node(key)
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_dict(child) and not child._is_none() and len(child):
            yield from leaves(child, dotted)
        elif not (OmegaConf.is_dict(child) and not child._is_none()):   # an empty dict sets nothing
            yield dotted, child


@pytest.mark.parametrize("overrides", COMMANDS, ids=lambda o: " ".join(o) or "default")
def test_each_chain_ends_in_the_value_hydra_composed(overrides):
    """The replay of the defaults list agrees with Hydra's own composition, key for key (values as written)."""
    cfg = composed(overrides)
    chains = provenance("train", overrides)
    keys = {k: v for k, v in leaves(cfg) if k.split(".", 1)[0] != "hydra"}
    assert set(keys) == set(chains)
    for key, node in keys.items():
        written = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node._value()
        assert chains[key][-1][1] == written, (key, chains[key])


def test_the_record_names_the_file_that_overrode_each_key():
    chains = provenance("train", ["method.lr=3e-4"])
    assert chains["method.lr"] == [(SCHEMA, 1e-6), ("method/grpo.yaml", 1e-6), ("scale/tiny.yaml", 1e-4),
                                   (COMMAND_LINE, 3e-4)]
    assert chains["method.group_size"][-2:] == [("method/thor.yaml", 16), ("scale/tiny.yaml", 8)]
    assert chains["method.step_level.weight"] == [(SCHEMA, 1.0), ("scale/tiny.yaml", 0.1)]
    assert chains["method.loss.clip_high"][-1] == ("method/thor.yaml", 0.28)
    changed = overridden(chains)
    assert {"method.lr", "method.group_size", "method.step_level.weight", "rollout.max_new_tokens"} <= set(changed)
    assert "method.loss.kl_coef" not in changed and "data.train" not in changed   # set once, by their own group
    paper = provenance("train", ["method=thor", "model=qwen8b"])
    assert paper["method.lr"][-1] == ("method/grpo.yaml", 1e-6) and "scale/tiny.yaml" not in str(paper)


def test_a_run_logs_and_saves_its_provenance(train_cfg, tmp_path, caplog):
    cfg = train_cfg("experiment=dcore_tiny", "method.lr=5e-4")
    with caplog.at_level(logging.INFO, logger="tirl.config.provenance"):
        record_provenance(cfg, str(tmp_path))
    record = yaml.safe_load((tmp_path / ".hydra" / "provenance.yaml").read_text())
    assert record["method.lr"] == {"value": 5e-4, "from": COMMAND_LINE,
                                   "over": {"method/grpo.yaml": 1e-6, "scale/tiny.yaml": 1e-4,
                                            "experiment/dcore_tiny.yaml": 2e-4}}
    assert record["rollout.max_tool_rounds"]["from"] == "experiment/dcore_tiny.yaml"
    assert record["method.loss.clip_low"] == {"value": 0.2, "from": "method/grpo.yaml"}
    assert "method.weight_decay" not in record   # left at the schema's default: not listed
    assert "method.lr" in caplog.text and "scale/tiny.yaml" in caplog.text


def test_provenance_flag_prints_and_exits_without_training():
    proc = subprocess.run([sys.executable, "src/train.py", "method=thor", "model=qwen8b", "--provenance"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("method.group_size "))
    assert "16" in line and "<- method/thor.yaml (over method/grpo.yaml: 8)" in line
    assert "scale/" not in proc.stdout and "Instantiating" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------ presets say only what they change


@pytest.mark.parametrize("method", [m for m in group_options(CONFIG_DIR, "method") if m not in ("grpo", "sft")])
def test_rl_presets_inherit_grpo_and_restate_none_of_its_values(method):
    raw = OmegaConf.load(CONFIG_DIR / "method" / f"{method}.yaml")
    assert list(raw.defaults) == ["grpo", "_self_"]
    base = composed(["method=grpo", "scale=paper"]).method
    for key, node in leaves(OmegaConf.masked_copy(raw, [k for k in raw if k != "defaults"])):
        assert OmegaConf.select(base, key) != node._value(), f"method/{method}.yaml restates {key} of method/grpo.yaml"


# ------------------------------------------------------------------ the reward follows the data's task


def test_the_reward_follows_the_data_task_unless_the_method_names_one(train_cfg, tmp_path):
    def reward(*overrides):
        return validate(train_cfg(*overrides)).method.reward.name

    assert reward() == "math" and reward("method=dcore") == "math"
    assert reward("method=dcore", "data=synthetic_toolcall") == "toolcall"
    assert reward("method=grpo", "data=bfcl", "data.train=synthetic:toolcall") == "toolcall"
    assert reward("data=synthetic_toolcall", "method=dcore", "method.reward.name=toolcall_exact") == "toolcall_exact"
    calls = tmp_path / "calls.jsonl"
    calls.write_text(json.dumps({"id": "1", "task": "toolcall", "messages": [], "answer": []}) + "\n")
    assert reward("method=dcore", "data=jsonl", f"data.train={calls}") == "toolcall"          # from the records
    assert reward("method=dcore", "data=jsonl", f"data.train={calls}", "data.task=math") == "math"  # declared wins
    untold = tmp_path / "untold.jsonl"
    untold.write_text(json.dumps({"id": "1", "messages": [], "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match=r"data\.task=math or data\.task=toolcall"):
        reward("data=jsonl", f"data.train={untold}")


# ------------------------------------------------------------------ choices and schemas


def test_registry_choices_come_from_rl_core(train_cfg, monkeypatch):
    from tirl.config.validate import registry_choices
    from tirl.rl import core

    assert validate(train_cfg("method.loss.kl_kind=low_var_kl")).method.loss.kl_kind == "low_var_kl"
    monkeypatch.setitem(core.LOSS_AGGREGATIONS, "seq-sum", core.LOSS_AGGREGATIONS["token-mean"])
    registry_choices.cache_clear()
    try:
        assert validate(train_cfg("method.loss.agg=seq-sum")).method.loss.agg == "seq-sum"   # registered → valid
    finally:
        registry_choices.cache_clear()
    with pytest.raises(ConfigError, match="valid choices: k1, k2, k3, low_var_kl"):
        validate(train_cfg("method.loss.kl_kind=k4"))


@pytest.mark.parametrize("group", sorted({*SCHEMAS, *(g for g, _ in OPTION_SCHEMAS)}))
def test_every_option_of_a_typed_group_extends_its_schema(group):
    for option in group_options(CONFIG_DIR, group):
        defaults = list(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml").get("defaults", []))
        schema = f"_schema_{option}" if (group, option) in OPTION_SCHEMAS else "_schema"
        assert schema in defaults or "grpo" in defaults or option == "tiny_scratch" and group == "scale", (group, option)


@pytest.mark.parametrize("entry,override", [("tirgen", "sandbox.workrs=4"), ("tirgen", "backends.actor.dtyp=x"),
                                            ("eval", "task.n_sample=3"), ("distill", "backends.policy.modle=x")])
def test_pipeline_and_eval_groups_are_typed(entry, override):
    with pytest.raises(Exception, match="workrs|dtyp|n_sample|modle"):
        composed([override], entry)
    if entry == "tirgen":   # the typed sandbox group, with the values tirgen.yaml's untyped dict had
        sandbox = composed([], entry).sandbox
        assert (sandbox.kind, sandbox.workers, sandbox.timeout_s, sandbox.url) == ("local", 2, 5.0, None)
