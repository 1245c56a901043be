"""Weights out of an FSDP2-sharded policy (issue 20): sharded checkpoints, exact resume on 2 ranks, export and every
``init_from`` reader on one process, and (vLLM group) the weight push from a 2-rank sharded policy.

The 2-rank runs go through the real ``src/train.py`` with Lightning's ``ModelParallelStrategy`` on CPU (gloo),
``method.module._target_=sharded_run.RandomRolloutGRPO``: the real GRPO module, datamodule and checkpoint callback,
with rollouts drawn from each rank's RNG streams instead of generated (``tests/sharded_run.py``). Each rank draws a
different amount, so the ranks' streams differ, as uneven generation lengths make them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tirl.config import CONFIG_DIR, ConfigError
from tirl.models.load import ModelNotFoundError, init_kind, load_policy, read_checkpoint

REPO = CONFIG_DIR.parent
TESTS = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 4, 2
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=16",
        "model.lora.target_modules=[q_proj,v_proj,down_proj]"]
BASE = "tiny-warm"   # what model=tiny trains
PROBE = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n\\boxed{42}"


def run_ranks(cmd: list[str], env: dict, timeout: float, cwd=REPO) -> str:
    """Run a command that starts its own ranks; a hang is a failure after ``timeout`` s with every process it
    started killed (its own session: Lightning's and torch's rank processes included)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[1]} hung for {timeout:.0f} s (a rank waiting in a collective?); killed.\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    return out


def train(out: Path, *overrides: str) -> Path:
    """A 2-rank sharded GRPO run of ``STEPS`` steps, a checkpoint every ``SAVE_EVERY``; returns its run directory."""
    out.mkdir(parents=True)
    cmd = [sys.executable, str(REPO / "src" / "train.py"), "model=tiny", "method=grpo", "data=synthetic_math",
           "method.module._target_=sharded_run.RandomRolloutGRPO",
           "trainer.strategy={_target_:lightning.pytorch.strategies.ModelParallelStrategy,"
           "data_parallel_size:2,tensor_parallel_size:1,save_distributed_checkpoint:true}",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", f"trainer.max_steps={STEPS}",
           "method.group_size=2", "method.rollout_batch_size=4", "method.micro_batch_size=2",
           "validate_before_fit=false", "test=false", "optimized_metric=null", "trainer.limit_val_batches=0",
           f"callbacks.model_checkpoint.every_n_train_steps={SAVE_EVERY}", "callbacks.model_checkpoint.save_top_k=-1",
           "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", "sandbox.workers=1",
           f"hydra.run.dir={out / 'run'}", f"paths.log_dir={out / 'logs'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "TIRL_RECORD_DIR": str(out), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run_ranks(cmd, env, timeout=120)
    return out / "run"


def records(out: Path, rank: int) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (out / f"rank{rank}.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module", params=["full", "lora"])
def runs(request, tmp_path_factory):
    """An uninterrupted 2-rank run and one resumed from its sharded step-2 checkpoint, full fine-tune or LoRA."""
    root = tmp_path_factory.mktemp(request.param)
    extra = [*LORA, "method.lr=1e-2"] if request.param == "lora" else ["method.lr=1e-3"]
    whole = train(root / "whole", *extra)
    train(root / "resumed", *extra, f"ckpt_path={whole / 'checkpoints' / 'step_000002.ckpt'}")
    return {"kind": request.param, "whole": root / "whole", "resumed": root / "resumed", "ckpts": whole / "checkpoints"}


def probe_logits(model) -> torch.Tensor:
    from tirl.models.tiny import load_tiny_tokenizer

    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([load_tiny_tokenizer().encode(PROBE)])).logits[0]


def trained_model(runs):
    """The policy at the end of the uninterrupted run, as FSDP's own full state dict holds it (a LoRA adapter merged)."""
    from tirl.models.load import LoraSpec

    final = torch.load(runs["whole"] / "final_policy.pt", weights_only=True)
    lora = LoraSpec(r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]) if runs["kind"] == "lora" else None
    model = load_policy(BASE, lora=lora)
    model.load_state_dict(final, strict=True)
    return (model.merge_and_unload() if runs["kind"] == "lora" else model), final


@pytest.mark.distributed
def test_a_sharded_checkpoint_is_a_dcp_directory_holding_every_ranks_rng_streams(runs):
    ckpt = runs["ckpts"] / "step_000002.ckpt"
    assert ckpt.is_dir() and (runs["ckpts"] / "last.ckpt").is_dir()
    assert {p.name for p in ckpt.iterdir()} == {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"}
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    rng = meta["tirl_rng"]
    assert isinstance(rng, list) and len(rng) == 2
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])     # the ranks' streams differ: one copy would not do
    assert rng[0]["python"] != rng[1]["python"] and rng[0]["numpy"] != rng[1]["numpy"]
    assert meta["RLPromptDataModule"]["refills_per_rank"] == [0, 0] and meta["RLPromptDataModule"]["next_batch"] == 2


@pytest.mark.distributed
def test_resuming_a_sharded_checkpoint_on_two_ranks_logs_the_uninterrupted_runs_losses(runs):
    for rank in range(2):
        whole, resumed = records(runs["whole"], rank), records(runs["resumed"], rank)
        assert sorted(whole) == list(range(1, STEPS + 1))
        assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))   # steps 1-2 came from the checkpoint
        for step, row in resumed.items():
            # the same prompts (data position), the same draws (this rank's RNG), the same loss (weights, optimizer)
            assert row["drawn"] == whole[step]["drawn"], (rank, step)
            assert row["loss"] == whole[step]["loss"] and row["grad_norm"] == whole[step]["grad_norm"], (rank, step)
    # rank 1 restored with rank 0's streams would have drawn rank 0's tokens: the comparison above can tell
    r0, r1 = records(runs["whole"], 0)[SAVE_EVERY + 1], records(runs["whole"], 1)[SAVE_EVERY + 1]
    assert [d[1] for d in r0["drawn"]] != [d[1] for d in r1["drawn"]]


@pytest.mark.distributed
def test_one_process_reads_a_sharded_checkpoint_exports_it_and_transformers_loads_the_trained_policy(runs, tmp_path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tirl import export

    last = runs["ckpts"] / "last.ckpt"
    assert init_kind(str(last)) == "ckpt" and not dist.is_initialized()   # one process, no process group
    want, final = trained_model(runs)
    weights, spec, hparams = read_checkpoint(str(last))
    assert (spec is not None) == (runs["kind"] == "lora") and hparams["model"]["name_or_path"] == BASE
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)

    out = tmp_path / "hf"
    export.run(OmegaConf.create({"ckpt": str(last), "out": str(out), "merge_lora": True}))
    got = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(probe_logits(got), probe_logits(want), atol=1e-5, rtol=0)
    # ... which is not the starting model: the export carries the training
    assert (probe_logits(load_policy(BASE)) - probe_logits(want)).abs().max() > 1e-3
    # init_from (RL start, evaluation) reads the directory the same way
    torch.testing.assert_close(probe_logits(load_policy(BASE, init_from=str(last))), probe_logits(want),
                               atol=1e-5, rtol=0)
    if runs["kind"] == "lora":   # the adapter alone, onto its base
        adapter = tmp_path / "adapter"
        export.run(OmegaConf.create({"ckpt": str(last), "out": str(adapter), "merge_lora": False}))
        assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
        torch.testing.assert_close(probe_logits(load_policy(BASE, init_from=str(adapter))), probe_logits(want),
                                   atol=1e-5, rtol=0)


# ------------------------------------------------------------------ a foreign or incomplete directory (no ranks)
def dcp_dir(path: Path, state: dict, meta: dict | None = None) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    if meta is not None:
        torch.save(meta, path / "meta.pt")
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("drop, says", [
    (".metadata", "incomplete sharded checkpoint directory (no .metadata)"),
    ("meta.pt", "incomplete sharded checkpoint directory (no meta.pt)"),
    ("__0_0.distcp", "incomplete sharded checkpoint directory (no __0_0.distcp)"),   # a rank's shards lost
])
def test_an_incomplete_sharded_directory_is_one_sentence_everywhere_it_is_read(tmp_path, drop, says):
    from tirl.config.preflight import check_paths
    from tirl.export import run as export_run

    ckpt = dcp_dir(tmp_path / "last.ckpt", {"state_dict": {"policy.w": torch.ones(2)}}, {"hyper_parameters": {}})
    if drop.endswith(".distcp"):   # another rank's shard file stays, so only the index tells that one is missing
        shutil.copy(ckpt / drop, ckpt / "__1_0.distcp")
    (ckpt / drop).unlink()
    raised = []
    for call in (lambda: read_checkpoint(str(ckpt)), lambda: load_policy("tiny", init_from=str(ckpt)),
                 lambda: check_paths(OmegaConf.create({"ckpt_path": str(ckpt)}), None),
                 lambda: check_paths(OmegaConf.create({"init_from": str(ckpt)}), None),
                 lambda: export_run(OmegaConf.create({"ckpt": str(ckpt), "out": str(tmp_path / "o"), "merge_lora": True}))):
        with pytest.raises((ModelNotFoundError, ConfigError)) as err:
            call()
        raised.append(str(err.value))
    for msg in raised:
        assert says in msg and "\n" not in msg and msg.endswith("."), msg


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_directory_that_is_not_a_tirl_checkpoint_is_one_sentence(tmp_path):
    foreign = dcp_dir(tmp_path / "other", {"model": {"w": torch.ones(2)}}, {"hyper_parameters": {}})
    with pytest.raises(ModelNotFoundError, match="sharded checkpoint without policy weights"):
        read_checkpoint(str(foreign))
    (tmp_path / "empty").mkdir()
    from tirl.config.preflight import check_paths
    from tirl.export import run as export_run

    for call in (lambda: read_checkpoint(str(tmp_path / "empty")),   # e.g. ckpt=run/checkpoints: one wording everywhere
                 lambda: check_paths(OmegaConf.create({"ckpt_path": str(tmp_path / "empty")}), None),
                 lambda: export_run(OmegaConf.create({"ckpt": str(tmp_path / "empty"), "out": str(tmp_path / "o"),
                                                      "merge_lora": True}))):
        with pytest.raises((ModelNotFoundError, ConfigError)) as err:
            call()
        msg = str(err.value)
        assert "empty" in msg and "is neither a file nor a sharded checkpoint directory;" in msg and "\n" not in msg


# ------------------------------------------------------------------ the vLLM push (vLLM venv)
@pytest.mark.distributed
@pytest.mark.vllm
def test_weights_gathered_from_a_two_rank_sharded_policy_reach_each_ranks_engine(tmp_path):
    """Per rank, full then LoRA: the engine's log-probs equal the sharded trainer's after each push (1e-4, the vLLM
    tests' CPU tolerance), are far off while the engine still serves the pre-update weights (what a missed or wrong
    push looks like), the gather merges nothing into the live model, and the trainer's group survives the engines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIRL_RANK_TIMEOUT": "100"}
    run_ranks([sys.executable, str(TESTS / "sharded_vllm_push.py"), str(tmp_path), str(port)], env, timeout=150,
              cwd=tmp_path)
    tol = 1e-4
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["group_alive"]
        for kind in ("full", "lora"):
            r = result[kind]
            assert r["sharded"] and r["local_numel"] * 2 == r["full_numel"]   # each rank holds half of every tensor
            assert r["pushed_keys_are_hf_names"]
            assert r["gap_after_first_push"] < tol and r["gap_after_update_push"] < tol, (rank, kind, r)
            assert r["gather_left_trainer_unchanged"] == 0.0
            assert r["trainer_moved"] > 0.1 and r["gap_stale_engine"] > 100 * tol, (rank, kind, r)


def test_each_rank_resumes_its_own_refill_position():
    """Refill prompts are counted per rank (rank r draws refill r, r + world, …) and Lightning saves rank 0's
    datamodule state alone: the checkpoint carries every rank's count and each rank takes its own back."""
    from types import SimpleNamespace

    from tirl.data.rl_datamodule import RLPromptDataModule
    from tirl.models.tiny import load_tiny_tokenizer

    def module(rank: int, refills: int):
        dm = RLPromptDataModule(load_tiny_tokenizer(), train="synthetic:math", batch_size=4, val_size=0)
        gather = lambda t: torch.tensor([3, 5])   # noqa: E731  what strategy.all_gather returns on both ranks
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=SimpleNamespace(all_gather=gather))
        dm._refills = refills
        return dm

    state = module(0, 3).state_dict()
    assert state["refills_per_rank"] == [3, 5]
    for rank, want in ((0, 3), (1, 5)):
        dm = module(rank, 0)
        dm.load_state_dict(state)
        assert dm._refills == want
    old = {k: v for k, v in state.items() if k != "refills_per_rank"}   # a checkpoint from before: one count
    dm = module(1, 0)
    dm.load_state_dict(old)
    assert dm._refills == 3


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resuming_a_sharded_directory_without_a_sharded_strategy_is_one_sentence(tmp_path):
    from tirl.config.preflight import check_paths

    ckpt = dcp_dir(tmp_path / "last.ckpt", {"state_dict": {"policy.w": torch.ones(2)}}, {"hyper_parameters": {}})
    mp = {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy", "data_parallel_size": 2}
    check_paths(OmegaConf.create({"ckpt_path": str(ckpt), "trainer": {"strategy": mp}}), None)   # hardware=fsdp
    for strategy in ("ddp", "auto", {"_target_": "lightning.pytorch.strategies.DDPStrategy"}):
        with pytest.raises(ConfigError, match="only a sharded run resumes; add hardware=fsdp") as err:
            check_paths(OmegaConf.create({"ckpt_path": str(ckpt), "trainer": {"strategy": strategy}}), None)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------ resuming with settings the weights do not fit
FULL = {"policy.model.embed_tokens.weight": torch.ones(2)}
LORA_KEYS = {"policy.base_model.model.model.layers.0.q_proj.lora_A.default.weight": torch.ones(2),
        "policy.base_model.model.model.layers.0.q_proj.base_layer.weight": torch.ones(2)}
REF = {"frozen_ref.model.embed_tokens.weight": torch.ones(2)}


def written(path: Path, sharded: bool, state: dict, lora: bool, kl_coef: float) -> Path:
    """A checkpoint with ``state``'s key names and the hyper-parameters of such a run: a sharded directory (written
    on this one process) or a plain ``.ckpt`` file."""
    hp = {"model": {"lora": {"enabled": lora, "r": 8, "target_modules": ["q_proj"]}},
          "method": {"kind": "rl", "loss": {"kl_coef": kl_coef}}}
    if sharded:
        return dcp_dir(path, {"state_dict": state}, {"hyper_parameters": hp})
    torch.save({"state_dict": state, "hyper_parameters": hp}, path)
    return path


def resume(ckpt: Path, lora: bool, kl_coef: float, r: int = 8) -> None:
    from tirl.config.preflight import check_paths

    mp = {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"}
    check_paths(OmegaConf.create({"ckpt_path": str(ckpt), "trainer": {"strategy": mp},
                                  "model": {"lora": {"enabled": lora, "r": r, "target_modules": ["q_proj"]}},
                                  "method": {"kind": "rl", "loss": {"kl_coef": kl_coef}}}), None)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "file"])
@pytest.mark.parametrize("state, lora, kl, run_lora, run_kl, run_r, says", [
    (FULL, False, 0.0, True, 0.0, 8, "was written with model.lora.enabled=false but this run has model.lora.enabled=true"),
    (LORA_KEYS, True, 0.05, False, 0.0, 8, "was written with model.lora.enabled=true but this run has model.lora.enabled=false"),
    (LORA_KEYS, True, 0.0, True, 0.0, 16, "was written with model.lora.r=8 but this run has model.lora.r=16"),
    (FULL, False, 0.0, False, 0.05, 8,   # a THOR run (kl 0) resumed as method=dcore (kl > 0)
     "was written with method.loss.kl_coef=0.0 (without a KL reference copy) but this run has method.loss.kl_coef=0.05"),
    ({**FULL, **REF}, False, 0.05, False, 0.0, 8,
     "was written with method.loss.kl_coef=0.05 (with a KL reference copy) but this run has method.loss.kl_coef=0.0"),
])
def test_resuming_with_settings_the_checkpoints_weights_do_not_fit_is_one_sentence(tmp_path, sharded, state, lora, kl,
                                                                                   run_lora, run_kl, run_r, says):
    ckpt = written(tmp_path / "last.ckpt", sharded, state, lora, kl)
    resume(ckpt, lora, kl)   # the settings it was written with resume
    with pytest.raises(ConfigError) as err:
        resume(ckpt, run_lora, run_kl, run_r)
    msg = str(err.value)
    assert says in msg and f"start a new run from its weights with init_from={ckpt}." in msg and "\n" not in msg, msg


def test_resuming_from_a_file_that_is_no_checkpoint_is_one_sentence(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"^ckpt_path: '.*last.ckpt' could not be read as a Lightning checkpoint "
                                          r"\(\w+\); pass a checkpoint written by a tirl run\.$"):
        resume(bad, False, 0.0)
