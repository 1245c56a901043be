"""Entry points and the task wrapper: `--cfg job` loads nothing, mistakes exit in one sentence, loggers always close.

The real modules/datamodules are other files' business; `run` is exercised here with the stubs below, which
receive exactly the constructor arguments the real ones get.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tirl.config import CONFIG_DIR, ConfigError, register_loggers, runnable, task_wrapper
from tirl.config.schema import DataConfig, MethodConfig, ModelConfig, RolloutConfig, SandboxConfig
from tirl.config.wrapper import _open_loggers

REPO = CONFIG_DIR.parent
PYTHON = sys.executable


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # what a user sees: HYDRA_FULL_ERROR (set for the test session) would add tracebacks to user errors
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([PYTHON, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ command line


def test_cfg_job_prints_the_resolved_groups_without_loading_torch():
    script = (
        "import runpy, sys\n"
        "sys.argv = ['src/train.py', 'method=thor', 'model=qwen8b', '--cfg', 'job']\n"
        "try:\n    runpy.run_path('src/train.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH_IMPORTED', 'torch' in sys.modules)\n"
    )
    start = time.perf_counter()
    proc = run_cli("-c", script)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "name_or_path: Qwen/Qwen3-8B" in proc.stdout
    assert "_target_: tirl.modules.thor.ThorModule" in proc.stdout
    assert "clip_high: 0.28" in proc.stdout and "group_size: 16" in proc.stdout
    assert "TORCH_IMPORTED False" in proc.stdout  # composing must not load a model (or torch)
    assert elapsed < 20


def test_eval_entry_point_composes():
    proc = run_cli("src/eval.py", "task=math", "bench=[math500,aime24]", "task.n_samples=4", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: math" in proc.stdout and "- math500" in proc.stdout and "n_samples: 4" in proc.stdout
    proc = run_cli("src/eval.py", "task=bfcl", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "multi_turn_long_context" in proc.stdout and "source: package" in proc.stdout
    proc = run_cli("src/eval.py", "task=bfcll")
    assert proc.returncode == 2 and "did you mean 'bfcl'?" in proc.stderr


def test_console_script_finds_the_checkout_configs():
    script = Path(PYTHON).parent / "tirl-train"
    if not script.exists():
        pytest.skip("package not installed with its console scripts (pip install -e .)")
    proc = subprocess.run([str(script), "method=dcore", "--cfg", "job"], cwd="/", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "DCoreModule" in proc.stdout


def test_unknown_group_option_exits_with_one_sentence():
    proc = run_cli("src/train.py", "method=thorr")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "Config error: Unknown option 'thorr' for config group 'method'; did you mean 'thor'? "
        "Valid choices: dapo, dcore, dr_grpo, grpo, sft, thor."
    )


def test_bad_value_inside_the_task_exits_with_one_sentence(tmp_path):
    proc = run_cli("src/train.py", "method.lr=fast", f"hydra.run.dir={tmp_path}", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "Config error: Config key 'method.lr' got 'fast' (str) but expects float."
    )


# ------------------------------------------------------------------ task wrapper


class RecordingLogger:
    def __init__(self, fail_on_close: bool = False):
        self.statuses: list[str] = []
        self.fail_on_close = fail_on_close

    def finalize(self, status: str) -> None:
        self.statuses.append(status)
        if self.fail_on_close:
            raise OSError("disk full")


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list[int] = []
    module = types.SimpleNamespace(run=object(), finish=lambda exit_code=0: calls.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wrapper_closes_every_logger_and_wandb_when_the_task_raises(fake_wandb):
    broken, healthy = RecordingLogger(fail_on_close=True), RecordingLogger()

    @task_wrapper
    def task(cfg):
        register_loggers([broken, healthy])
        raise RuntimeError("rollout exploded")

    with pytest.raises(RuntimeError, match="rollout exploded"):
        task({})
    assert broken.statuses == ["failed"] and healthy.statuses == ["failed"]  # one failing close doesn't stop the rest
    assert fake_wandb == [1]
    assert _open_loggers == []


def test_wrapper_returns_the_result_and_closes_with_success(fake_wandb):
    logger = RecordingLogger()

    @task_wrapper
    def task(cfg):
        register_loggers([logger])
        return 0.5

    assert task({}) == 0.5
    assert logger.statuses == ["success"] and fake_wandb == [0]


def test_nested_tasks_close_only_their_own_loggers():
    outer_logger, inner_logger = RecordingLogger(), RecordingLogger()

    @task_wrapper
    def inner(cfg):
        register_loggers([inner_logger])
        raise ValueError("inner")

    @task_wrapper
    def outer(cfg):
        register_loggers([outer_logger])
        with pytest.raises(ValueError):
            inner(cfg)
        assert outer_logger.statuses == []  # still open while the outer task runs
        return 1

    assert outer({}) == 1
    assert inner_logger.statuses == ["failed"] and outer_logger.statuses == ["success"]


def test_wrapper_flushes_a_real_csv_logger_on_failure(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")

    @task_wrapper
    def task(cfg):
        register_loggers([logger])
        logger.log_metrics({"train/loss": 1.25}, step=0)
        raise RuntimeError("after the first step")

    with pytest.raises(RuntimeError):
        task({})
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in text and "1.25" in text


# ------------------------------------------------------------------ tirl.train.run with stub module/datamodule

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

torch.set_num_threads(1)
RECEIVED: dict = {}


class StubDataModule(pl.LightningDataModule):
    def __init__(self, tokenizer, enable_thinking=True, tool_prompt="system", loss_on=None, **data_fields):
        super().__init__()
        RECEIVED["data"] = DataConfig(**data_fields)
        RECEIVED["tool_prompt"] = tool_prompt
        RECEIVED["tokenizer"] = tokenizer

    def _loader(self) -> DataLoader:
        x = torch.arange(8, dtype=torch.float32).unsqueeze(1)  # [8, 1]
        return DataLoader(TensorDataset(x), batch_size=RECEIVED["data"].batch_size)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()


class StubModule(pl.LightningModule):
    """Learns w → 2 on y = w·x; val/acc = fraction of val points with |w·x − 2x| < 1 (depends on training)."""

    def __init__(self, method, model, rollout, sandbox, tokenizer, init_from, fail: bool = False):
        super().__init__()
        RECEIVED.update(method=method, model=model, rollout=rollout, sandbox=sandbox, init_from=init_from)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.lr = method.lr
        self.fail = fail

    def training_step(self, batch, batch_idx):
        if self.fail:
            raise RuntimeError("stub failure in training_step")
        (x,) = batch  # [B, 1]
        loss = ((self.w * x - 2 * x) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val/acc", ((self.w * x - 2 * x).abs() < 1).float().mean())

    def test_step(self, batch, batch_idx):
        (x,) = batch
        self.log("test/acc", ((self.w * x - 2 * x).abs() < 1).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def stub_cfg(tmp_path: Path, *extra: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sft_dir = tmp_path / "sft"   # init_from must exist at start: an HF directory the stub module only records
    sft_dir.mkdir(exist_ok=True)
    (sft_dir / "config.json").write_text("{}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "method=thor", "method.module._target_=test_entrypoints.StubModule", "method.lr=0.02",
            "data._target_=test_entrypoints.StubDataModule", "trainer.max_steps=6", "trainer.val_check_interval=3",
            "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", f"init_from={sft_dir}",
            *extra,
        ])
    return runnable(cfg, str(tmp_path))


def test_run_wires_typed_groups_into_the_module_and_returns_the_metric(tmp_path):
    from tirl.train import run

    RECEIVED.clear()
    value = run(stub_cfg(tmp_path))
    assert isinstance(RECEIVED["method"], MethodConfig) and RECEIVED["method"].group_size == 8   # tiny scale
    assert isinstance(RECEIVED["model"], ModelConfig) and RECEIVED["model"].name_or_path == "tiny-warm"
    assert isinstance(RECEIVED["rollout"], RolloutConfig) and isinstance(RECEIVED["sandbox"], SandboxConfig)
    assert RECEIVED["init_from"] == str(tmp_path / "sft") and RECEIVED["data"].batch_size == 8   # = method.rollout_batch_size (tiny scale)
    assert RECEIVED["tokenizer"].padding_side == "left" and RECEIVED["tool_prompt"] == "system"
    # the returned value is the last logged val/acc (the test stage logs test/acc, which must not replace it)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    val_accs = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_accs) == 3 and value == pytest.approx(val_accs[-1])   # before fit, then every 3 steps
    assert any(r.get("train/loss") for r in rows) and any(r.get("test/acc") for r in rows)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_run_names_a_metric_that_was_never_logged(tmp_path):
    from tirl.train import run

    with pytest.raises(ConfigError, match="optimized_metric 'val/reward' was never logged.*val/acc"):
        run(stub_cfg(tmp_path, "optimized_metric=val/reward", "callbacks.model_checkpoint.monitor=val/acc",
                     "trainer.max_steps=3"))


def test_run_failure_propagates_and_leaves_no_logger_open(tmp_path):
    from tirl.train import run

    with pytest.raises(RuntimeError, match="stub failure"):
        run(stub_cfg(tmp_path, "+method.module.fail=true"))
    assert _open_loggers == []


def test_gpu_config_without_cuda_fails_in_one_sentence(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from tirl.train import run

    with pytest.raises(ConfigError, match="CUDA is not available here; use hardware=cpu"):
        run(stub_cfg(tmp_path, "hardware=gpu"))


def test_wandb_logger_leaves_out_the_anonymous_setting_wandb_warns_about(tmp_path):
    # wandb.init warns "The anonymous setting has no effect" whenever the key is passed, even as None (Lightning's
    # default); tirl's logger passes it only when a config asks for anonymous logging
    from tirl.logging.wandb import WandbLogger

    assert "anonymous" not in WandbLogger(offline=True, save_dir=str(tmp_path))._wandb_init
    assert WandbLogger(offline=True, save_dir=str(tmp_path), anonymous=True)._wandb_init["anonymous"] == "allow"


def test_cpu_offload_on_cpu_ranks_is_refused_at_start(tmp_path):
    from tirl.train import run

    with pytest.raises(ConfigError, match=r"already run on the CPU \(trainer.accelerator=cpu\); set model.fsdp.cpu_offload=false"):
        run(stub_cfg(tmp_path, "model.fsdp.cpu_offload=true"))
    assert _open_loggers == []


def test_a_round_that_does_not_split_over_the_ranks_is_refused_before_any_rank_starts(tmp_path):
    """devices=3 with 8 prompts a round: said once, by the launching process, not after loading and validating on
    every rank (StubModule would fail if it were built into a fit)."""
    from tirl.rl.schedule import ScheduleError
    from tirl.train import run

    with pytest.raises(ScheduleError, match="must be a multiple of the 3 training processes; set it to 6"):
        run(stub_cfg(tmp_path, "hardware=ddp", "trainer.accelerator=cpu", "trainer.devices=3",
                     "trainer.precision=32-true", "method.rollout_batch_size=8"))


def test_multinode_started_bare_on_one_machine_is_refused_instead_of_waiting(tmp_path, monkeypatch):
    from tirl.train import run

    monkeypatch.delenv("NODE_RANK", raising=False)
    with pytest.raises(ConfigError, match="trainer.num_nodes=2 but this process was not started by a multi-node launcher"):
        run(stub_cfg(tmp_path, "hardware=multinode", "trainer.accelerator=cpu", "trainer.devices=2"))
