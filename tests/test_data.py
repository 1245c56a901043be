"""Sources (validation, bad lines, round trips), SFT collate and packing, datamodules (determinism, resume)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tirl.data.chat_template import OUTPUT_BLOCK, encode_conversation
from tirl.data.collate import IGNORE, Example, collate_packed, pack_examples, pad_examples
from tirl.data.datamodules import RLPromptDataModule, SFTDataModule
from tirl.data.prompts import task_messages
from tirl.data.record_checks import rl_problem, sft_problem
from tirl.data.sources import DataError, load_records, write_records
from tirl.data.synthetic_math import make_math_rl_prompts
from tirl.data.synthetic_toolcall import make_toolcall_rl_prompts, make_toolcall_sft_samples
from tirl.models.tiny import build_tiny, load_tiny_tokenizer

torch.set_num_threads(1)
MATH_SFT = {
    "messages": [
        {"role": "system", "content": "Use python."},
        {"role": "user", "content": "What is 37 * 48 + 5?"},
        {"role": "assistant", "content": "<think>\nMultiply, then add.\n</think>\n\n```python\nprint(37 * 48 + 5)\n```\n"
                                         "```output\n1781\n```\n\\boxed{1781}"},
    ],
    "loss_on": "assistant",
}


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def write_jsonl(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- validation and bad lines


def test_record_validation_reasons():
    good_rl = make_math_rl_prompts(1, seed=0)[0]
    assert rl_problem(good_rl) is None and sft_problem(MATH_SFT) is None
    assert "needs ['answer']" in rl_problem({k: v for k, v in good_rl.items() if k != "answer"})
    assert '"task" must be' in rl_problem({**good_rl, "task": "chess"})
    assert "math \"answer\" must be a string" in rl_problem({**good_rl, "answer": 1781})
    assert "must not end with an assistant" in rl_problem({**good_rl, "messages": MATH_SFT["messages"]})
    tool = make_toolcall_rl_prompts(1, seed=0)[0]
    assert rl_problem(tool) is None and rl_problem({**tool, "answer": []}) is None
    assert "one-key object" in rl_problem({**tool, "answer": [{"f": {}, "g": {}}]})
    assert "list of allowed values" in rl_problem({**tool, "answer": [{"f": {"a": 1}}]})
    # a call list as text is refused with the form expected, never read as "no call expected"
    assert "is not one: give each argument its list of allowed values" in rl_problem(
        {**tool, "answer": '[get_weather(city="Paris")]'})
    assert 'give "answer": []' in rl_problem({**tool, "category": "irrelevance"})
    assert rl_problem({**tool, "answer": [], "category": "live_relevance"}) is None
    assert "at least one assistant" in sft_problem({"messages": MATH_SFT["messages"][:2]})
    assert "valid roles" in sft_problem({"messages": [{"role": "bot", "content": "x"}]})
    assert '"loss_on"' in sft_problem({**MATH_SFT, "loss_on": "all"})
    assert '"tools"' in sft_problem({**MATH_SFT, "tools": ["get_weather"]})


def test_bad_line_error_names_file_and_line_and_skip_counts(tmp_path):
    good = json.dumps(MATH_SFT)
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, "{not json", good, "", json.dumps({"messages": []}), good])
    with pytest.raises(DataError, match=r"train\.jsonl line 3: not valid JSON"):
        list(load_records(path, kind="sft"))
    with pytest.raises(DataError) as err:  # blank line 5 is not a record; line 6 is the next bad one
        list(load_records(write_jsonl(tmp_path / "b.jsonl", [good] * 5 + [json.dumps({"messages": []})]), kind="sft"))
    assert "b.jsonl line 6: \"messages\" must be a non-empty list" in str(err.value)
    assert str(err.value).endswith("set data.on_bad_line=skip.")
    stream = load_records(path, on_bad_line="skip", kind="sft")
    assert len(list(stream)) == 4 and stream.skipped == 2
    assert len(list(stream)) == 4 and stream.skipped == 2  # a second pass counts afresh
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl").__iter__().__next__()
    with pytest.raises(DataError, match="on_bad_line"):
        load_records(path, on_bad_line="ignore")


def test_jsonl_parquet_and_directory_round_trips(tmp_path):
    records = make_math_rl_prompts(4, seed=0) + make_toolcall_rl_prompts(4, seed=0)
    records[0] = {**records[0], "answer": "[0, 1)"}  # a math answer that looks like JSON stays text
    for name in ("a.jsonl", "b.parquet"):
        back = list(load_records(write_records(tmp_path / "d" / name, records), kind="rl"))
        assert back == records
    assert list(load_records(tmp_path / "d", kind="rl")) == records + records  # sorted: a.jsonl, b.parquet
    sft = make_toolcall_sft_samples(3, seed=0) + [MATH_SFT]  # tools present in some rows only
    assert list(load_records(write_records(tmp_path / "s.parquet", sft), kind="sft")) == sft


def test_hf_dataset_spec_reads_a_local_dataset(tmp_path):
    records = make_math_rl_prompts(3, seed=0)
    write_records(tmp_path / "ds" / "train.jsonl", records)
    back = list(load_records(f"hf:{tmp_path / 'ds'}:train", kind="rl"))
    assert [r["id"] for r in back] == [r["id"] for r in records]
    assert back[1]["messages"] == records[1]["messages"] and back[1]["answer"] == records[1]["answer"]


# ---------------------------------------------------------------- collate and packing


def test_sft_labels_only_on_model_written_assistant_tokens(tok):
    (seq,) = encode_conversation(tok, MATH_SFT["messages"])
    ids, mask = seq.input_ids, seq.loss_mask
    batch = pad_examples([Example(ids, mask)], tok.pad_token_id)
    labels = batch["labels"][0]
    trained = tok.decode([t for t in labels.tolist() if t != IGNORE])
    content = MATH_SFT["messages"][-1]["content"]
    assert trained == OUTPUT_BLOCK.sub("", content) + "<|im_end|>"  # everything the model wrote, nothing else
    assert "```output" not in trained and "1781\n```\n\\boxed" not in trained
    assert labels[: len(ids) - len(tok.encode(content, add_special_tokens=False)) - 2].eq(IGNORE).all()


# Environment text that looks like structure: a fenced block, an end-of-turn, a think tag, a boxed answer.
HOSTILE_OUTPUT = "Result:\n```\nx = 4\n```\nDONE <|im_end|> </think> \\boxed{9}"


def hostile_turn(tok_output: str = HOSTILE_OUTPUT) -> tuple[dict, str, str]:
    """An assistant turn whose tool output prints structure; (message, model-written text, output block)."""
    before, block, after = "<think>\nCompute.\n</think>\n\n```python\nprint(x)\n```\n", \
        f"```output\n{tok_output}\n```", "\nSo \\boxed{4}"
    text = before + block + after
    return ({"role": "assistant", "content": text, "env_spans": [[len(before), len(before) + len(block)]]},
            before + after, block)


def test_sft_mask_of_environment_text_comes_from_recorded_spans(tok):
    """A hand-written sample whose tool output prints a fence, <|im_end|>, </think> and \boxed{}: no loss on any of
    it (the old pattern stopped the output block at the printed fence and trained on `DONE ...`), and the
    printed <|im_end|> is ordinary tokens, not the end-of-turn id."""
    turn, model_text, block = hostile_turn()
    messages = MATH_SFT["messages"][:2] + [turn]
    assert sft_problem({"messages": messages}) is None
    (seq,) = encode_conversation(tok, messages)
    ids, mask = seq.input_ids, seq.loss_mask
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == model_text + "<|im_end|>"
    assert "DONE" not in trained and "\\boxed{9}" not in trained
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 3                         # system, user, assistant ends — not the printed one
    assert ids.count(tok.convert_tokens_to_ids("</think>")) == 1     # the model's own; the printed one is plain
    assert block in tok.decode(ids)                       # the text itself is kept, as plain tokens
    # a tool turn is environment text as well
    (tool_seq,) = encode_conversation(tok, messages[:2] + [{"role": "tool", "content": HOSTILE_OUTPUT},
                                                           {"role": "assistant", "content": "ok"}])
    tool_ids, tool_mask = tool_seq.input_ids, tool_seq.loss_mask
    assert tool_ids.count(im_end) == 4
    # what the template writes for the answer (Qwen3 gives the last turn an empty think block), none of the output
    assert tok.decode([t for t, m in zip(tool_ids, tool_mask) if m]) == "<think>\n\n</think>\n\nok<|im_end|>"


def test_env_spans_are_validated():
    turn, _, _ = hostile_turn()
    for bad in ([[5, 2]], [[0, 10 ** 6]], [[10, 20], [15, 30]], "0-10", [[0.5, 3]]):
        assert "env_spans must be sorted" in sft_problem({"messages": [{**turn, "env_spans": bad}]})
    assert "only an assistant turn" in sft_problem({"messages": [{"role": "user", "content": "x", "env_spans": [[0, 1]]},
                                                                 {"role": "assistant", "content": "y"}]})


def test_synthetic_sft_samples_record_their_output_spans(tok):
    from tirl.data.synthetic_math import math_sft_sample, problem_at
    problem = problem_at(0, 3, (1,), "train")
    sample = math_sft_sample(problem, "12\n```\n<|im_end|>")
    turn = sample["messages"][-1]
    (start, end), = turn["env_spans"]
    assert turn["content"][start:end] == "```output\n12\n```\n<|im_end|>\n```"
    assert sft_problem(sample) is None


def test_right_padding_by_hand():
    batch = pad_examples([Example([5, 6, 7], [0, 1, 1]), Example([8], [1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_packing_by_hand():
    examples = [Example([11, 12, 13], [0, 1, 1]), Example([21, 22, 23, 24], [1, 1, 0, 1]), Example([31, 32], [1, 1])]
    rows = list(pack_examples(examples, max_length=8))
    assert [r.seq_lens for r in rows] == [[3, 4], [2]]
    batch = collate_packed(rows, pad_id=0, max_length=8)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 23, 24, 0], [31, 32, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    # each sample's first label is masked (the boundary), then its own mask applies
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22, IGNORE, 24, IGNORE], [IGNORE, 32] + [IGNORE] * 6]
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0], [1, 1] + [0] * 6]
    with pytest.raises(ValueError, match="truncate"):
        list(pack_examples([Example([1] * 9, [1] * 9)], max_length=8))


def test_packed_row_forward_equals_separate_forwards():
    model, _ = build_tiny(seed=0)
    model.eval()
    a, b = Example([5, 6, 7, 8, 9], [1] * 5), Example([10, 11, 12], [1] * 3)
    batch = collate_packed(list(pack_examples([a, b], max_length=10)), pad_id=0, max_length=10)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits   # [1, 10, V]
        alone_a = model(torch.tensor([a.input_ids])).logits                                              # [1, 5, V]
        alone_b = model(torch.tensor([b.input_ids])).logits                                              # [1, 3, V]
    torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[:, 5:8], alone_b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- SFT datamodule


def test_sft_datamodule_batches_deterministic_and_masked(tmp_path, tok):
    samples = make_toolcall_sft_samples(24, seed=0)
    path = write_records(tmp_path / "sft.jsonl", samples)

    def first_batch(seed: int, **kw):
        dm = SFTDataModule(tok, train=str(path), batch_size=4, val_size=4, seed=seed, max_length=1024, **kw)
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))

    dm, b1 = first_batch(0)
    _, b2 = first_batch(0)
    _, b3 = first_batch(1)
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and not torch.equal(b1["input_ids"], b3["input_ids"])
    assert len(dm._sets["train"]) == 20 and len(dm._sets["val"]) == 4
    assert b1["input_ids"].shape == b1["labels"].shape == b1["attention_mask"].shape
    assert (b1["labels"][b1["attention_mask"] == 0] == IGNORE).all()  # no loss on padding
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert not (b1["labels"] == im_start).any()  # turn headers never get loss
    _, packed = first_batch(0, packing=True)
    assert packed["input_ids"].shape[1] == 1024 and "position_ids" in packed


def test_sft_loss_on_last_assistant_and_truncation(tmp_path, tok):
    two_turns = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "xx"},
                              {"role": "user", "content": "b"}, {"role": "assistant", "content": "yy"}],
                 "loss_on": "last_assistant"}
    path = str(write_records(tmp_path / "t.jsonl", [two_turns] * 3))
    dm = SFTDataModule(tok, train=path, val_size=1, loss_on="assistant")  # the sample's own loss_on wins
    (ex,) = dm.encode(two_turns)
    # Qwen3's template gives the final answer an empty think block, as the model writes it when thinking is on
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]) == \
        "<think>\n\n</think>\n\nyy<|im_end|>"
    assert dm.truncated == 0 and len(ex) > 20
    short = SFTDataModule(tok, train=path, val_size=1, max_length=20)
    assert short.encode(two_turns)[0].input_ids == ex.input_ids[:20] and short.truncated == 1


def test_unknown_options_are_errors(tok):
    with pytest.raises(DataError, match="did you mean 'val_size'"):
        SFTDataModule(tok, train="x.jsonl", valsize=3)
    with pytest.raises(DataError, match="did you mean 'batch_size'"):
        RLPromptDataModule(tok, train="synthetic:math", batch_sise=3)
    with pytest.raises(DataError, match="SFT only"):
        RLPromptDataModule(tok, train="synthetic:math", packing=True)
    with pytest.raises(DataError, match="synthetic:math or synthetic:toolcall"):
        RLPromptDataModule(tok, train="synthetic:chess").setup()


# ---------------------------------------------------------------- RL datamodule


def ids(batch) -> list[str]:
    return [r["id"] for r in batch]


def test_rl_stream_is_seeded_resumable_and_refills_do_not_shift_it(tok):
    def module(seed=0):
        dm = RLPromptDataModule(tok, train="synthetic:toolcall", batch_size=3, val_size=5, seed=seed)
        dm.setup("fit")
        return dm

    dm = module()
    stream = dm.iter_train()
    first = [ids(next(stream)) for _ in range(3)]
    assert first[0] == ["toolcall-train-0-0", "toolcall-train-0-1", "toolcall-train-0-2"]
    refill = dm.refill_prompts(2)
    state = dm.state_dict()
    assert state["next_batch"] == 3 and state["refills"] == 2
    expected_next = ids(next(stream))

    resumed = module()
    resumed.load_state_dict(state)
    assert ids(next(resumed.iter_train())) == expected_next
    assert ids(resumed.refill_prompts(1)) != ids(refill)[:1]  # refills continue too
    plain = module().iter_train()
    assert [ids(next(plain)) for _ in range(4)] == first + [expected_next]  # refills never shift batches
    other = module(seed=1).iter_train()
    assert ids(next(other)) == ["toolcall-train-1-0", "toolcall-train-1-1", "toolcall-train-1-2"]
    assert [r["answer"] for r in next(module().iter_train())] != [r["answer"] for r in next(module(seed=1).iter_train())]


def test_rl_synthetic_size_cycles_a_finite_prompt_set(tok):
    dm = RLPromptDataModule(tok, train="synthetic:toolcall", batch_size=3, val_size=2, synthetic={"size": 4})
    dm.setup("fit")
    stream = dm.iter_train()
    seen = [i for _ in range(4) for i in ids(next(stream))]
    assert seen == [f"toolcall-train-0-{i % 4}" for i in range(12)]   # 12 draws = the first 4 prompts, 3 times
    endless = RLPromptDataModule(tok, train="synthetic:toolcall", batch_size=3, val_size=2)
    endless.setup("fit")
    first = next(endless.iter_train())
    assert [r["answer"] for r in first] == [r["answer"] for r in next(dm.iter_train())]   # the same prompts
    refills = dm.refill_prompts(5)   # refills come from the same 4 prompts
    assert ids(refills) == [f"toolcall-train-0-{i}" for i in (3, 2, 1, 0, 3)]
    with pytest.raises(DataError, match="synthetic.size must be at least 1"):
        RLPromptDataModule(tok, train="synthetic:math", synthetic={"size": 0}).setup()


def test_synthetic_split_picks_the_train_half(tok):
    # data.synthetic.split=rl: RL prompts from the half of the train split a warm start SFT'd on `sft` never saw
    from tirl.data.synthetic_math import in_split

    dm = RLPromptDataModule(tok, train="synthetic:toolcall", batch_size=4, val_size=2, synthetic={"split": "rl"})
    dm.setup("fit")
    batch = next(dm.iter_train())
    assert ids(batch) == [f"toolcall-rl-0-{i}" for i in range(4)]

    def key(r):   # ToolTask.key: query | offered function names
        user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        return user + "|" + ",".join(t["name"] for t in r["tools"])

    assert all(in_split(key(r), "rl") and not in_split(key(r), "sft") for r in batch)
    assert dm.val_records and all(in_split(key(r), "heldout") for r in dm.val_records)   # val stays held-out
    sft = SFTDataModule(tok, train="synthetic:toolcall", synthetic={"split": "sft", "size": 20}, val_size=2)
    records = sft._records("synthetic:toolcall", "train")   # the records its train set is encoded from
    assert len(records) == 20 and all(in_split(key(r), "sft") for r in records)
    sft.setup("fit")
    assert len(sft._sets["train"]) == 20
    with pytest.raises(DataError, match="data.synthetic.split must be one of"):
        RLPromptDataModule(tok, train="synthetic:math", synthetic={"split": "heldout"}).setup()


def test_sft_synthetic_size_none_means_the_default_1000(tok):
    # the schema's default is None ("1000 samples for sft"); it used to reach int() and raise a TypeError
    dm = SFTDataModule(tok, train="synthetic:toolcall", synthetic={"size": None}, val_size=4)
    dm.setup("fit")
    assert len(dm._sets["train"]) == 1000


def test_rl_prefetched_batches_are_not_counted_as_consumed(tok):
    dm = RLPromptDataModule(tok, train="synthetic:math", batch_size=2, val_size=2)
    loader = iter(dm.train_dataloader())
    fetched = [next(loader) for _ in range(3)]  # a trainer may fetch ahead of what it trained on
    dm.on_before_batch_transfer(fetched[0], 0)
    assert dm.state_dict()["next_batch"] == 1


def test_rl_val_test_are_fixed_heldout_sets(tok):
    dm = RLPromptDataModule(tok, train="synthetic:math", batch_size=4, val_size=6)
    dm.setup()
    val = [r for b in dm.val_dataloader() for r in b]
    test = [r for b in dm.test_dataloader() for r in b]
    assert len(val) == len(test) == 6 and not {r["id"] for r in val} & {r["id"] for r in test}
    assert all(r["id"].startswith("math-heldout") for r in val + test)
    assert val == [r for b in dm.val_dataloader() for r in b]  # fixed across epochs
    train_questions = {r["messages"][0]["content"] for _, b in zip(range(50), dm.iter_train(), strict=False) for r in b}
    assert not train_questions & {r["messages"][0]["content"] for r in val + test}


def test_rl_file_source_epochs_holdout_and_length_filter(tmp_path, tok):
    records = make_math_rl_prompts(12, seed=0)
    long = {**records[0], "id": "too-long", "messages": [{"role": "user", "content": "word " * 400}]}
    path = write_records(tmp_path / "rl.jsonl", records + [long])
    dm = RLPromptDataModule(tok, train=str(path), batch_size=5, val_size=2, max_length=128)
    dm.setup()
    assert dm.too_long == 1 and len(dm.val_records) == 2
    stream = dm.iter_train()
    seen = [r["id"] for _ in range(4) for r in next(stream)]  # 20 prompts = 2 epochs of the 10 train records
    assert sorted(seen[:10]) == sorted(seen[10:]) and seen[:10] != seen[10:]  # reshuffled each epoch
    assert not set(seen) & {r["id"] for r in dm.val_records}


def test_rl_resume_through_lightning_checkpoint(tmp_path, tok):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(ids(batch))
            return (self.w * 0).sum() + self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt: str | None = None):
        dm = RLPromptDataModule(tok, train="synthetic:math", batch_size=2, val_size=2)
        model = Recorder()
        trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return model, trainer

    full, _ = fit(5)
    first, trainer = fit(3)
    ckpt = str(tmp_path / "three.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed, _ = fit(5, ckpt)
    assert first.seen + resumed.seen == full.seen and len(resumed.seen) == 2


@pytest.mark.skipif(importlib.util.find_spec("bfcl_eval") is None, reason="bfcl-eval is not installed")
def test_bfcl_items_are_rl_prompts(tok):
    records = list(load_records("bfcl:simple", kind="rl"))
    # BFCL's own system prompt lists the functions; the records carry them as "tools" for the reward only
    assert len(records) == 400 and all(r["task"] == "toolcall" and r["tools_in_messages"] and r["tools"]
                                       for r in records)
    assert records[0]["messages"][0]["role"] == "system" and records[0]["messages"][-1]["role"] == "user"
    # shown once: the prompt is BFCL's messages as they are, with no second listing of the functions
    messages, template_tools = task_messages(records[0])
    assert messages == records[0]["messages"] and template_tools is None
    irrelevance = list(load_records("bfcl:irrelevance", kind="rl"))
    assert irrelevance and all(r["answer"] == [] for r in irrelevance)
    with pytest.raises(DataError, match="multi-turn"):
        list(load_records("bfcl:multi_turn_base"))
    dm = RLPromptDataModule(tok, train=None, test="bfcl:simple", max_length=64)  # evaluation only
    dm.setup("test")
    assert len(dm.test_records) == 400 and dm.too_long == 400  # counted, never dropped from a benchmark
    with pytest.raises(DataError, match="no training prompts"):
        next(iter(dm.train_dataloader()))
