"""The shipped tiny model: a checkpoint like any other, small, and actually warm."""

import torch

from tirl.models.load import load_policy, load_tokenizer
from tirl.models.tiny import build_tiny, tiny_warm_dir


def test_warm_checkpoint_loads_by_name_and_by_path_and_is_small():
    by_name, by_path = load_policy("tiny-warm"), load_policy(str(tiny_warm_dir()))
    for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values()):
        assert torch.equal(a, b)
    assert sum(f.stat().st_size for f in tiny_warm_dir().iterdir()) < 10 * 2**20
    tok_name, tok_path = load_tokenizer("tiny-warm"), load_tokenizer(str(tiny_warm_dir()))
    text = "<|im_start|>user\nprint(37 * 48)<|im_end|>"
    assert tok_name.encode(text) == tok_path.encode(text) and tok_path.decode(tok_path.encode(text)) == text


def test_save_pretrained_round_trip(tmp_path):
    model, tok = build_tiny(3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_policy(str(tmp_path))
    ids = torch.tensor([tok.encode("hello world")])
    assert torch.allclose(model(ids).logits, again(ids).logits)


def test_warm_checkpoint_solves_some_held_out_math_greedily():
    from tirl.benchmarks.heldout import heldout_accuracy

    # measured 0.59 on 64 problems (0.50 on these 16) when shipped (scripts/make_tiny_warm.py); a random model
    # scores 0
    assert heldout_accuracy("tiny-warm", "math", n=16) >= 0.3
