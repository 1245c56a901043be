"""vLLM rollouts: the pure parts on fake vLLM outputs (CPU), the engine itself on a GPU (marked)."""

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
from tirl.rollout.backend import HFBackend, fence_token_index
from tirl.rollout.types import SamplingParams

torch.set_num_threads(1)


def test_no_gpu_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(V.VLLMUnavailableError, match=r"^rollout=vllm needs a CUDA GPU .* use rollout=hf") as e:
        V.VLLMBackend.colocated(object(), None, RolloutConfig(backend="vllm"))
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_make_backend_routes_vllm_to_the_same_error(monkeypatch):
    from tirl.modules.grpo import make_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(V.VLLMUnavailableError):
        make_backend(RolloutConfig(backend="vllm"), object(), None)


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
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(
            model=types.SimpleNamespace(load_weights=lambda weights: self.loaded.append(dict(weights)))))
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
    assert gens[0].logprobs == [-0.5] * len(ids)
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
    pushed = llm.loaded[-1]["model.embed_tokens.weight"]
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


# ------------------------------------------------------------------ on a GPU with vllm installed
@pytest.mark.gpu
def test_hf_and_vllm_agree_greedily_on_the_tiny_model():
    pytest.importorskip("vllm")
    tok = load_tiny_tokenizer()
    policy = build_tiny(0)[0].cuda()
    cfg = RolloutConfig(backend="vllm", gpu_memory_utilization=0.2, max_prompt_tokens=64, max_total_tokens=64)
    vb = V.VLLMBackend.colocated(policy, tok, cfg, dtype="float32")
    prompts = [tok.encode(f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n") for i in range(4)]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_at_code=False)
    hf = HFBackend(policy, tok).generate(prompts, greedy)
    vl = vb.generate(prompts, greedy)
    agree = sum(a == b for h, v in zip(hf, vl) for a, b in zip(h.ids[:8], v.ids[:8])) / sum(min(8, len(h.ids)) for h in hf)
    assert agree >= 0.9
    for h, v in zip(hf, vl):
        n = min(4, len(h.ids), len(v.ids))
        if h.ids[:n] == v.ids[:n]:
            torch.testing.assert_close(torch.tensor(v.logprobs[:n]), torch.tensor(h.logprobs[:n]), atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_weight_sync_changes_vllm_outputs():
    pytest.importorskip("vllm")
    tok = load_tiny_tokenizer()
    policy = build_tiny(0)[0].cuda()
    cfg = RolloutConfig(backend="vllm", gpu_memory_utilization=0.2, max_prompt_tokens=64, max_total_tokens=64)
    prompts = [tok.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_code=False)
    before = V.VLLMBackend.colocated(policy, tok, cfg, dtype="float32").generate(prompts, greedy)[0]
    with torch.no_grad():
        policy.lm_head.weight.mul_(-1.0)              # in place: bumps the parameter version like an optimiser step
    after = V.VLLMBackend.colocated(policy, tok, cfg, dtype="float32").generate(prompts, greedy)[0]
    assert after.ids != before.ids
    hf = HFBackend(policy, tok).generate(prompts, greedy)[0]
    assert after.ids == hf.ids
