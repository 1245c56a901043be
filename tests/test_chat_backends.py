"""Chat backends over real HTTP on 127.0.0.1: our server with the tiny model (both pipelines through it), and a
fake server that answers 500s and stalls, to check retries, timeouts and failure accounting. Every request loop
here is bounded in count and time."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from hydra import compose, initialize_config_dir

from tirl.config import CONFIG_DIR
from tirl.pipelines.chat_backends import (
    ChatBackendError,
    ChatConfigError,
    ChatParams,
    HFChatBackend,
    HTTPChatBackend,
)
from tirl.pipelines.jobs import run_distill, run_tirgen
from tirl.pipelines.server import start_server, stop_server

torch.set_num_threads(1)
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tiny_server():
    backend = HFChatBackend.from_name("tiny")
    server, thread = start_server(backend, port=0, model_name="tiny")
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", backend
    stop_server(server, thread)


def test_http_backend_matches_the_in_process_model_and_honours_n_seed_stop(tiny_server):
    url, local = tiny_server
    http = HTTPChatBackend(url, "tiny", max_concurrency=2, timeout_s=30, max_retries=0)
    params = ChatParams(max_tokens=12, temperature=1.0, n=2, seed=7)
    remote = http.complete(MESSAGES, params)
    assert len(remote) == 2 and remote == local.complete(MESSAGES, params)  # same seed → same samples
    greedy = ChatParams(max_tokens=12, temperature=0.0)
    full = http.complete(MESSAGES, greedy)[0]
    stop = full[3:5]
    cut = http.complete(MESSAGES, ChatParams(max_tokens=12, temperature=0.0, stop=[stop]))[0]
    assert cut == full[: full.find(stop)]
    # continuing a partial assistant turn = the prompt text extended by that partial text
    cont = http.complete(MESSAGES + [{"role": "assistant", "content": full[:4]}], greedy)[0]
    assert cont == local.complete(MESSAGES + [{"role": "assistant", "content": full[:4]}], greedy)[0]
    assert http.stats.as_dict()["ok"] == 4 and not http.stats.failures


class _FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    plan: list[str] = []          # per request: "500", "stall", "ok", "junk"
    seen = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            kind = self.plan[min(type(self).seen, len(self.plan) - 1)]
            type(self).seen += 1
        if kind == "stall":
            time.sleep(1.0)  # longer than the client's timeout
            return
        body = {"500": {"error": "down"}, "junk": {"nope": 1},
                "ok": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}]}}[kind]
        data = json.dumps(body).encode()
        self.send_response(500 if kind == "500" else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def with_plan(plan: list[str]) -> str:
        _FakeHandler.plan, _FakeHandler.seen = plan, 0
        return f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield with_plan
    server.shutdown()
    server.server_close()


def test_retries_recover_from_500s_and_a_stall(fake_server):
    url = fake_server(["500", "stall", "500", "ok"])
    http = HTTPChatBackend(url, "m", timeout_s=0.3, max_retries=3, backoff_s=0.01)
    assert http.complete(MESSAGES, ChatParams()) == ["fine"]
    s = http.stats.as_dict()
    assert s["retries"] == 3 and s["attempt_errors"] == {"http_5xx": 2, "timeout": 1} and s["failures"] == {}


def test_failures_end_in_bounded_time_and_are_counted_by_kind(fake_server):
    http = HTTPChatBackend(fake_server(["stall"]), "m", timeout_s=0.2, max_retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(ChatBackendError) as err:
        http.complete(MESSAGES, ChatParams())
    assert err.value.kind == "timeout" and time.monotonic() - start < 3 * 0.2 + 1.0
    assert http.stats.as_dict()["failures"] == {"timeout": 1} and http.stats.retries == 2
    junk = HTTPChatBackend(fake_server(["junk", "ok"]), "m", timeout_s=1, max_retries=3, backoff_s=0.01)
    with pytest.raises(ChatBackendError):
        junk.complete(MESSAGES, ChatParams())  # not retried: the server answered, wrongly
    assert junk.stats.as_dict()["failures"] == {"bad_response": 1} and junk.stats.retries == 0
    refused = HTTPChatBackend("http://127.0.0.1:9/v1", "m", timeout_s=0.5, max_retries=1, backoff_s=0.01)
    with pytest.raises(ChatBackendError) as err:
        refused.complete(MESSAGES, ChatParams())
    assert err.value.kind == "connection"


def test_missing_api_key_variable_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("TIRL_TEST_KEY", raising=False)
    with pytest.raises(ChatConfigError, match="TIRL_TEST_KEY is not set"):
        HTTPChatBackend("http://127.0.0.1:1/v1", "m", api_key_env="TIRL_TEST_KEY")


def test_pipeline_errors_from_a_failing_server_are_counted_not_fatal(tmp_path, fake_server):
    url = fake_server(["500"])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[f"output={tmp_path}/d.jsonl", "input.synthetic.n=4",
                                            "backend@backends.decomposer=http", f"backends.decomposer.base_url={url}",
                                            "backends.decomposer.max_retries=1", "backends.decomposer.backoff_s=0.01",
                                            "backends.decomposer.timeout_s=1"])
    report = run_distill(cfg, show_progress=False)
    expected_errors = report["items"] - report["templates"].get("irrelevance", 0)
    assert report["errors"] == expected_errors and report["error_kinds"] == {"http_5xx": expected_errors}
    assert report["backends"]["decomposer"]["failures"] == {"http_5xx": expected_errors}


def test_both_pipelines_through_the_local_server(tmp_path, tiny_server):
    url, _ = tiny_server
    http = [f"backends.{r}.base_url={url}" for r in ("decomposer", "policy")]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        dcfg = compose("distill", overrides=[f"output={tmp_path}/d.jsonl", "input.synthetic.n=3", "max_concurrency=3",
                                             "backend@backends.decomposer=http", "backend@backends.policy=http", *http,
                                             "decomposer_params.max_tokens=16", "policy_params.max_tokens=16"])
        tcfg = compose("tirgen", overrides=[f"output={tmp_path}/t.jsonl", "input.synthetic.n=2", "max_steps=2",
                                            "backend@backends.actor=http", "backend@backends.critic=http",
                                            f"backends.actor.base_url={url}", f"backends.critic.base_url={url}",
                                            "actor_params.max_tokens=12", "critic_params.max_tokens=12", "sandbox.workers=1"])
    d = run_distill(dcfg, show_progress=False)
    assert d["items"] == 3 and d["errors"] == 0 and d["kept"] + d["dropped"] == 3
    t = run_tirgen(tcfg, show_progress=False)
    assert t["items"] == 2 and t["errors"] == 0
    assert t["backends"]["actor"]["ok"] == t["backends"]["actor"]["requests"] >= 2
