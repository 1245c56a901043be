"""Checkpoints in and out: every ``init_from`` kind starts RL at the earlier stage's model with KL 0 to its reference,
RL's first update pass on unchanged weights has ratio 1 whatever dropout the model has, and ``src/export.py``
writes HF directories that plain transformers loads and that score as the ``.ckpt`` does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tirl.config.schema import LoraConfig, LossConfig, MethodConfig, ModelConfig, RolloutConfig, SandboxConfig
from tirl.models.forward import sequence_logits
from tirl.models.load import ModelNotFoundError, load_policy
from tirl.models.tiny import build_tiny, load_tiny_tokenizer
from tirl.modules.grpo import GRPOModule
from tirl.modules.policy import PolicyModule
from tirl.rl import core
from tirl.rl.batch import Sample, TensorBatch, collate_samples

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SFT_RUN = ["model=tiny", "method=sft", "data=sft_synthetic_math", "data.synthetic.size=16", "data.batch_size=4",
           "data.val_size=2", "trainer.max_steps=2", "test=false", "validate_before_fit=false", "method.warmup_steps=0",
           "optimized_metric=null", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false"]
LORA_SFT = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=16", "model.lora.target_modules=[q_proj,v_proj,down_proj]"]
PROBE = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n<think>\nadd them\n</think>\n\n\\boxed{42}"


def train_run(out, *overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tirl.config import CONFIG_DIR, runnable
    from tirl.train import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=list(overrides))
    run(runnable(cfg, str(out)))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Two real 2-step SFT runs over tiny-warm (full, LoRA) and what export writes from them: every init_from kind."""
    root = tmp_path_factory.mktemp("stages")
    full = train_run(root / "sft_full", *SFT_RUN, "method.lr=1e-3")
    lora = train_run(root / "sft_lora", *SFT_RUN, *LORA_SFT, "method.lr=2e-2")
    hf, adapter = root / "hf", root / "adapter"
    PolicyModule.load_from_checkpoint(str(full)).export_hf(str(hf))
    PolicyModule.load_from_checkpoint(str(lora)).export_hf(str(adapter), merge_lora=False)
    return {"full_ckpt": full, "lora_ckpt": lora, "hf": hf, "adapter": adapter}


def probe_logits(model) -> torch.Tensor:
    ids = torch.tensor([load_tiny_tokenizer().encode(PROBE)])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[0]


def sft_end_logits(ckpt) -> torch.Tensor:
    """The SFT run's own model, rebuilt from its raw state dict without tirl's loader (LoRA: adapter on)."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights = {k[len("policy."):]: v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    model = load_policy("tiny-warm")
    lora = state["hyper_parameters"]["model"]["lora"]
    if lora["enabled"]:
        model = get_peft_model(model, PeftLora(r=lora["r"], lora_alpha=lora["alpha"],
                                               target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    model.load_state_dict(weights, strict=True)
    return probe_logits(model)


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and msg.replace("e.g. ", "").count(". ") == 0


def rl_module(init_from=None, lora: bool = False, lora_dropout: float = 0.0, name_or_path: str = "tiny-warm",
              kl_coef: float = 0.1) -> GRPOModule:
    lora_cfg = LoraConfig(enabled=lora, r=4, alpha=8, dropout=lora_dropout, target_modules=["q_proj", "v_proj"])
    module = GRPOModule(MethodConfig(loss=LossConfig(kl_coef=kl_coef), micro_batch_size=8),
                        ModelConfig(name_or_path=name_or_path, lora=lora_cfg),
                        RolloutConfig(max_new_tokens=24, max_total_tokens=24, max_tool_rounds=0, temperature=1.0),
                        SandboxConfig(workers=1), load_tiny_tokenizer(), init_from=None if init_from is None else str(init_from))
    module.setup("fit")
    return module


def probe_batch(module) -> TensorBatch:
    """The probe's answer as one response, advantage +1, old log-probs from an eval-mode forward (as a rollout's)."""
    tok = load_tiny_tokenizer()
    prompt, response = PROBE.split("<|im_start|>assistant\n")
    p_ids = tok.encode(prompt + "<|im_start|>assistant\n")
    r_ids = tok.encode(response)
    tb = collate_samples([Sample(p_ids, r_ids, [1] * len(r_ids), [0.0] * len(r_ids), [1.0] * len(r_ids), 1.0)],
                         tok.pad_token_id)
    module.policy.eval()
    with torch.no_grad():
        logits = module.policy(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
        tb.old_log_probs = core.token_logprobs(logits, tb.targets) * tb.response_mask
    module.policy.train()
    return tb


# ---------------------------------------------------------------------------------------------- item: init_from
@pytest.mark.parametrize("rl_lora", [False, True], ids=["full_rl", "lora_rl"])
@pytest.mark.parametrize("kind", ["hf", "full_ckpt", "lora_ckpt", "adapter"])
def test_rl_starts_at_the_sft_model_with_zero_kl_from_every_init_from_kind(stages, kind, rl_lora):
    ckpt = stages["lora_ckpt" if kind in ("lora_ckpt", "adapter") else "full_ckpt"]
    want = sft_end_logits(ckpt)
    base = probe_logits(load_policy("tiny-warm"))
    assert (want - base).abs().max() > 1e-2          # SFT moved the model: starting from the base would show
    module = rl_module(stages[kind], lora=rl_lora)
    try:
        # the policy (the RL adapter is fresh, so it changes nothing yet) is the SFT run's final model ...
        assert torch.allclose(probe_logits(module.policy), want, atol=1e-4)
        from tirl.models.reference import reference_model

        # ... and so is the reference (LoRA: the adapter switched off = the merged SFT model; full: the frozen copy)
        with reference_model(module.policy, module.frozen_ref) as ref:
            assert torch.allclose(probe_logits(ref), want, atol=1e-4)
        tb = probe_batch(module)
        counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}
        _, metrics = module.micro_batch_loss(tb, counts)
        assert float(metrics["kl"]) <= 1e-6
        # what trains: every weight in a full fine-tune (a merged SFT adapter must not leave the base frozen), only
        # the fresh RL adapter under LoRA
        trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
        if rl_lora:
            assert trainable and all("lora_" in n for n in trainable)
        else:
            assert len(trainable) == len(list(module.policy.parameters()))
    finally:
        module.teardown("fit")


def test_a_lora_ckpt_is_merged_so_its_adapter_is_not_switched_off_by_the_reference(stages):
    """The fault this guards: LoRA SFT → LoRA RL with the SFT adapter kept as *the* adapter, so the reference (adapter
    off) was the pre-SFT base and the KL at step 0 was ~1. After the merge there is one adapter, the RL one, and
    only RL's weights train."""
    module = rl_module(stages["lora_ckpt"], lora=True)
    try:
        trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert all(p.abs().sum() == 0 for n, p in module.policy.named_parameters() if "lora_B" in n)   # fresh adapter
        assert not any("down_proj.lora_" in n for n, _ in module.policy.named_parameters())   # the SFT one's merged
    finally:
        module.teardown("fit")


def test_lora_sft_then_lora_rl_logs_zero_kl_at_its_first_step_and_exports_merged(stages, tmp_path):
    """The README's path end to end through the training entry: LoRA SFT → LoRA RL with a KL term. The first
    step's KL is measured before its one optimizer step (one micro-batch, one epoch), so it must be 0."""
    import csv

    ckpt = train_run(tmp_path / "rl", "model=tiny", "method=grpo", "data=synthetic_math", f"init_from={stages['lora_ckpt']}",
                     "model.lora.enabled=true", "model.lora.r=4", "method.loss.kl_coef=0.1", "method.group_size=2",
                     "method.rollout_batch_size=2", "method.micro_batch_size=64", "method.ppo_epochs=1",
                     "rollout.max_new_tokens=16", "rollout.max_total_tokens=16", "rollout.max_tool_rounds=0",
                     "trainer.max_steps=1", "trainer.limit_val_batches=0", "test=false", "validate_before_fit=false",
                     "optimized_metric=null", "callbacks.model_checkpoint.monitor=null",
                     "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false")
    rows = [r for r in csv.DictReader((tmp_path / "rl" / "csv" / "metrics.csv").open()) if r.get("train/kl")]
    assert rows and abs(float(rows[0]["train/kl"])) <= 1e-6
    # its base is the merged SFT model, which no directory holds: the adapter alone is refused, the merge is not
    from tirl.config import ConfigError

    with pytest.raises(ConfigError, match="export with merge_lora=true"):
        export_run(ckpt=str(ckpt), out=str(tmp_path / "adapter"), merge_lora=False)
    export_run(ckpt=str(ckpt), out=str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    rl_end = PolicyModule.load_from_checkpoint(str(ckpt)).policy
    assert torch.allclose(probe_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), probe_logits(rl_end),
                          atol=1e-4)


@pytest.mark.parametrize("path,says", [
    ("/no/such/sft.ckpt", "init_from='/no/such/sft.ckpt' does not exist; point it at a tirl .ckpt"),
    ("./missing_dir", "init_from='./missing_dir' does not exist"),
    ("EMPTY_DIR", "is not a Hugging Face checkpoint directory; check init_from."),   # e.g. a run's directory
    ("README.md", "'README.md' could not be read as a Lightning checkpoint"),
])
def test_a_bad_init_from_is_one_sentence_naming_it(path, says, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = str(tmp_path) if path == "EMPTY_DIR" else path
    module = PolicyModule(MethodConfig(), ModelConfig(name_or_path="tiny"), load_tiny_tokenizer(), init_from=path)
    with pytest.raises(ModelNotFoundError) as err:
        module.configure_model()
    assert says in str(err.value) and one_sentence(str(err.value))


def test_a_ckpt_of_another_model_is_one_sentence(stages, tmp_path):
    model, tok = build_tiny(0, hidden_size=64, head_dim=16, intermediate_size=128)
    model.save_pretrained(tmp_path / "narrow")
    tok.save_pretrained(tmp_path / "narrow")
    module = PolicyModule(MethodConfig(), ModelConfig(name_or_path=str(tmp_path / "narrow")), tok,
                          init_from=str(stages["full_ckpt"]))
    with pytest.raises(ModelNotFoundError, match="do not fit the model .*set model.name_or_path"):
        module.configure_model()


# ---------------------------------------------------------------------------------------------- item: dropout
@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    """tiny with attention dropout 0.3 in its config (Qwen3 applies it inside the attention kernel in train mode)."""
    out = tmp_path_factory.mktemp("dropout_model")
    model, tok = build_tiny(0, attention_dropout=0.3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("source", ["lora_dropout", "config_dropout"])
def test_first_update_pass_has_ratio_one_and_no_clipping_with_dropout(source, dropout_model_dir):
    torch.manual_seed(0)
    if source == "lora_dropout":
        module = GRPOModule(MethodConfig(), ModelConfig(name_or_path="tiny", lora=LoraConfig(enabled=True, r=4, dropout=0.3)),
                            RolloutConfig(), SandboxConfig(workers=1), load_tiny_tokenizer())
    else:
        module = GRPOModule(MethodConfig(), ModelConfig(name_or_path=str(dropout_model_dir)), RolloutConfig(),
                            SandboxConfig(workers=1), load_tiny_tokenizer())
    module.configure_model()
    if source == "lora_dropout":   # make the adapter matter, as after some training
        with torch.no_grad():
            for n, p in module.policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    ids = torch.tensor([load_tiny_tokenizer().encode(PROBE)])
    with torch.no_grad():
        # the dropout is real: a train-mode forward is not the eval-mode one (else this test could not fail)
        assert not torch.allclose(module.policy.train()(input_ids=ids).logits, module.policy.eval()(input_ids=ids).logits,
                                  atol=1e-3)
    module.setup("fit")
    try:
        # old log-probs as RL makes them: a sampled rollout in eval mode (the HF backend's own per-token log-probs)
        records = [{"id": i, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}
                   for i in range(4)]
        trajs = module.rollout_groups(records, 2)
        tb = collate_samples([Sample(t.prompt_ids, t.response_ids, t.response_mask, t.log_probs, t.entropies,
                                     1.0 if k % 2 else -1.0) for k, t in enumerate(trajs)], module.tokenizer.pad_token_id)
        module.policy.train()           # as Lightning leaves it in training_step
        tok = tb.response_window()
        logp = core.token_logprobs(sequence_logits(module.policy, tok, None), tok.targets,
                                   temperature=module.rollout_cfg.temperature)
        ratio = torch.exp(logp - tok.old_log_probs)[tok.response_mask.bool()]
        # against the sampler's own log-probs: equal up to fp32 resolution (a log-prob near -5 is exact to ~5e-7,
        # and the KV-cache decode adds its terms in another order than the one-pass forward)
        assert tok.response_mask.sum() > 20 and (ratio - 1).abs().max() <= 2e-6
        counts = {lv: module.global_counts(tb, lv) for lv in ("episode", "step")}
        _, metrics = module.micro_batch_loss(tb, counts)
        assert float(metrics["clipfrac_low"]) == 0 and float(metrics["clipfrac_high"]) == 0
        assert abs(float(metrics["ratio_mean"]) - 1) <= 1e-6
        # the update's own forward, twice in train mode, is deterministic: ratio exactly 1 against itself
        tb2 = probe_batch(module)
        tok2 = tb2.response_window()
        logp2 = core.token_logprobs(sequence_logits(module.policy.train(), tok2, None), tok2.targets)
        assert (torch.exp(logp2 - tok2.old_log_probs)[tok2.response_mask.bool()] - 1).abs().max() <= 1e-6
    finally:
        module.teardown("fit")


def test_sft_keeps_its_dropout():
    from tirl.modules.sft import SFTModule

    module = SFTModule(MethodConfig(kind="sft"), ModelConfig(name_or_path="tiny", lora=LoraConfig(enabled=True, r=4, dropout=0.3)),
                       load_tiny_tokenizer())
    module.setup("fit")
    module.configure_model()
    drops = [m.p for m in module.policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.3 for p in drops)


# ---------------------------------------------------------------------------------------------- item: export
def plain_greedy(model, tok, prompts: list[str]) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("kind,merge", [("full_ckpt", True), ("lora_ckpt", True), ("lora_ckpt", False)],
                         ids=["full", "lora_merged", "lora_adapter_only"])
def test_export_round_trip_loads_in_plain_transformers_and_scores_as_the_ckpt(stages, tmp_path, kind, merge):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tirl.benchmarks.heldout import heldout_records

    ckpt, out = stages[kind], tmp_path / "exported"
    if kind == "lora_ckpt" and merge:   # the command itself, once (a fresh Python costs seconds); else its run()
        r = subprocess.run([sys.executable, str(ROOT / "src" / "export.py"), f"ckpt={ckpt}", f"out={out}"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("*.log"))   # no run directory left
    else:
        export_run(ckpt=str(ckpt), out=str(out), merge_lora=merge)
    records = heldout_records("toolcall", 4)
    tok = AutoTokenizer.from_pretrained(out)
    prompts = [tok.apply_chat_template(rec["messages"], tools=rec.get("tools"), tokenize=False, add_generation_prompt=True)
               for rec in records]
    from_ckpt = PolicyModule.load_from_checkpoint(str(ckpt)).policy.eval()
    if merge:
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert "adapter_config.json" not in {p.name for p in out.iterdir()}
    else:
        from peft import PeftModel

        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "tiny-warm"
        plain = PeftModel.from_pretrained(load_policy("tiny-warm"), out)
    assert plain_greedy(plain.eval(), tok, prompts) == plain_greedy(from_ckpt, tok, prompts)

    # the same held-out score (greedy, tirl's evaluation path) from the exported directory and from the .ckpt
    exported = (held_out_correct(records, str(out), None) if merge      # an HF model directory of its own
                else held_out_correct(records, "tiny-warm", str(out)))  # the adapter: an init_from kind of its own
    assert sum(exported) > 0                      # a score of 0 would make the comparison empty
    assert exported == held_out_correct(records, "tiny-warm", str(ckpt))


def held_out_correct(records, name_or_path, init_from) -> list[float]:
    from tirl.benchmarks.heldout import preset_rollout
    from tirl.config.schema import RewardConfig

    module = GRPOModule(MethodConfig(reward=RewardConfig(name="toolcall_exact")), ModelConfig(name_or_path=name_or_path),
                        preset_rollout("toolcall"), SandboxConfig(workers=1), load_tiny_tokenizer(),
                        init_from=init_from)
    module.setup("validate")
    try:
        return [o["correct"] for o in module.validate_records(records, temperature=0.0)]
    finally:
        module.teardown("validate")


def export_run(**cfg):
    from omegaconf import OmegaConf

    from tirl.export import run

    return run(OmegaConf.create({"ckpt": "???", "out": "???", "merge_lora": True, **cfg}))


@pytest.mark.parametrize("cfg,says", [
    ({"ckpt": "/no/such.ckpt", "out": "x"}, "ckpt='/no/such.ckpt' is neither a file nor a sharded checkpoint "
                                            "directory; pass the path of a tirl .ckpt"),
    ({"ckpt": "tests", "out": "x"}, "ckpt='tests' is neither a file nor a sharded checkpoint directory"),   # a run/checkpoints
    ({"out": "x"}, "Config value 'ckpt' is required; set it on the command line"),
    ({"ckpt": "README.md", "out": "x"}, "'README.md' could not be read as a Lightning checkpoint"),
    ({"ckpt": "lora_ckpt", "out": "hf"}, "already exists and is not an empty directory; pick a new directory"),
])
def test_export_mistakes_are_one_sentence(stages, monkeypatch, cfg, says):
    from tirl.config import ConfigError

    monkeypatch.chdir(ROOT)
    cfg = {k: str(stages.get(v, v)) for k, v in cfg.items()}
    with pytest.raises(ConfigError) as err:
        export_run(**cfg)
    assert says in str(err.value) and one_sentence(str(err.value))


def test_export_command_mistakes_exit_2_without_a_traceback(tmp_path):
    from tirl.config import ConfigError
    from tirl.export import check_args

    with pytest.raises(ConfigError, match="Unknown export key 'ckt'; did you mean 'ckpt'"):
        check_args(["ckt=a.ckpt", "out=x"])
    check_args(["ckpt=a.ckpt", "out=x", "merge_lora=false", "hydra.run.dir=."])
    r = subprocess.run([sys.executable, str(ROOT / "src" / "export.py"), "ckpt=/no/such.ckpt", f"out={tmp_path / 'x'}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**__import__("os").environ, "HYDRA_FULL_ERROR": "0"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Config error: ckpt='/no/such.ckpt' is neither a file nor")


def test_load_from_checkpoint_rebuilds_the_module_a_ckpt_was_saved_from(stages):
    module = GRPOModule.load_from_checkpoint(str(stages["lora_ckpt"]), tokenizer=load_tiny_tokenizer())
    assert isinstance(module.method_cfg, MethodConfig) and module.model_cfg.lora.enabled
    assert torch.allclose(probe_logits(module.policy), sft_end_logits(stages["lora_ckpt"]), atol=1e-5)
