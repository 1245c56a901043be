"""The benchmark scripts measure what they claim: the update benchmark's padded, packed and TRL rows compute the same
update (loss and gradient norm), its length distribution is the stated one, and bench_rl's forced lengths hold in
both samplers (tirl's HF loop and transformers' generate, which TRL calls)."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_response_lengths_are_the_stated_log_normal():
    bu = load_script("bench_update")
    lengths = bu.response_lengths(4000, median=250, sigma=0.9, max_len=2000, min_len=16, seed=0)
    assert lengths == bu.response_lengths(4000, 250, 0.9, 2000, 16, 0)            # seeded
    assert min(lengths) >= 16 and max(lengths) == 2000                              # clipped, the cap is reached
    assert 235 <= statistics.median(lengths) <= 265                                 # median 250
    # P(L > 2000) = P(z > ln(8) / 0.9 = 2.31) = 1.0 %: the long tail is there but thin
    assert 0.005 < sum(n == 2000 for n in lengths) / len(lengths) < 0.02


def quick_args(bu) -> argparse.Namespace:
    args = argparse.Namespace(**bu.QUICK, sigma=0.9, beta=0.001, tmp="/tmp/tirl_test_bench_update", profile=False)
    return args


def test_bench_update_rows_compute_the_same_update():
    """Padded, packed (equal sequence counts and a token budget) and TRL's loss give one loss and one gradient norm
    on the benchmark's batch: the table compares the speed of the same computation."""
    bu = load_script("bench_update")
    args = quick_args(bu)
    if not bu.has_packing():
        pytest.skip("this tirl has no packed update")
    runs = [bu.run_tirl(args, packing=False, micro_tokens=None), bu.run_tirl(args, packing=True, micro_tokens=None),
            bu.run_tirl(args, packing=False, micro_tokens=args.micro_tokens),
            bu.run_tirl(args, packing=True, micro_tokens=args.micro_tokens)]
    if bu.has_trl():
        runs.append(bu.run_trl(args))
    for r in runs[1:]:
        assert r["loss"] == pytest.approx(runs[0]["loss"], abs=1e-5)
        assert r["grad_norm"] == pytest.approx(runs[0]["grad_norm"], rel=1e-4)
    assert runs[0]["grad_norm"] > 0


def test_model_flops_formula_by_hand():
    bu = load_script("bench_update")
    from tirl.models.tiny import build_bench_model
    from tirl.rl.batch import Sample

    model, _ = build_bench_model("tiny")
    cfg = model.config
    s = Sample([5] * 3, [6] * 2, [1, 1], [0.0, 0.0], [0.0, 0.0], 1.0)
    body = sum(p.numel() for p in model.model.parameters()) - cfg.vocab_size * cfg.hidden_size
    d_attn = cfg.num_attention_heads * cfg.head_dim
    want = 8 * (body * 5 + cfg.hidden_size * cfg.vocab_size * 2) + 8 * cfg.num_hidden_layers * d_attn * 25
    assert bu.model_flops(model, [s, s]) == 2 * want


def test_forced_lengths_hold_in_tirl_sampler_and_hf_generate():
    br = load_script("bench_rl")
    from tirl.models.tiny import build_tiny
    from tirl.rollout.backend import HFBackend
    from tirl.rollout.types import SamplingParams

    model, tok = build_tiny(0)
    lengths = [2, 9, 5, 17, 3, 12]
    forced = br.ForcedLengths(model, lengths, [tok.eos_token_id, tok.pad_token_id], tok.eos_token_id)
    prompts = [[1, 10, 11, 12]] * 3 + [[1, 20, 21]] * 3        # groups share a prompt: tirl reads it once
    params = SamplingParams(max_new_tokens=32, temperature=1.0, stop_at_code=False)
    gens = forced.during(HFBackend(model, tok).generate)(prompts, params)
    assert [len(g.ids) for g in gens] == lengths
    assert all(g.ids[-1] == tok.eos_token_id and g.stop_reason == "eos" for g in gens)
    # transformers' generate (TRL's sampler without vLLM): left-padded batch, the same lengths
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        out = forced.during(model.generate)(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=True,
                                            top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, width:]
    got = [int((row == tok.eos_token_id).nonzero()[0]) + 1 for row in new]
    assert got == lengths
    # outside ``during`` the hook does nothing: free sampling may stop anywhere
    assert forced.step is None


def test_bench_model_vocab_widens_embedding_and_head_only():
    from tirl.models.tiny import build_bench_model

    small, _ = build_bench_model("tiny")
    wide, tok = build_bench_model("tiny", vocab_size=4096)
    assert wide.config.vocab_size == 4096 and wide.get_output_embeddings().weight.shape == (4096, 128)
    extra = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in small.parameters())
    assert extra == (4096 - 1024) * 128                                     # tied embeddings: one matrix grows
    assert wide(input_ids=torch.tensor([[1, 4000]])).logits.shape == (1, 2, 4096)
    with pytest.raises(ValueError, match="below the tokenizer"):
        build_bench_model("tiny", vocab_size=512)
