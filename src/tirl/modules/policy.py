"""What SFT and RL modules share: the policy, its optimiser and schedule, and exact-resume state."""

from __future__ import annotations

import math
import random
from dataclasses import asdict

import lightning as L
import numpy as np
import torch

from tirl.config.schema import MethodConfig, ModelConfig
from tirl.logging.step_metrics import forget_step_metrics
from tirl.models.load import LoraSpec, load_policy
from tirl.models.reference import is_lora


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base LR at an optimiser step: linear warmup, then constant / cosine / linear decay."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"method.lr_schedule='{schedule}' must be one of ['constant', 'cosine', 'linear'].")

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


def _numpy_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, keys.tolist(), int(pos), int(has_gauss), float(cached)


class PolicyModule(L.LightningModule):
    """Loads the policy lazily in ``configure_model`` (so FSDP can shard it) from the model config or ``init_from``."""

    def __init__(self, method: MethodConfig, model: ModelConfig, tokenizer, init_from: str | None = None):
        super().__init__()
        self.method_cfg, self.model_cfg, self.tokenizer, self.init_from = method, model, tokenizer, init_from
        # plain dicts, so a checkpoint loads with torch.load(weights_only=True)
        self.save_hyperparameters({"method": asdict(method), "model": asdict(model), "init_from": init_from})
        self.policy = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        m = self.model_cfg
        lora = None
        if m.lora.enabled:
            lora = LoraSpec(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=list(m.lora.target_modules))
        from_ckpt = bool(self.init_from) and str(self.init_from).endswith(".ckpt")
        self.policy = load_policy(
            m.name_or_path if from_ckpt or not self.init_from else self.init_from, dtype=m.dtype,
            attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code,
            gradient_checkpointing=m.gradient_checkpointing, lora=lora, seed=m.seed,
        )
        if from_ckpt:
            self.load_policy_weights(self.init_from)

    def load_policy_weights(self, ckpt_path: str) -> None:
        """Start from the policy weights of a tirl Lightning checkpoint (e.g. the SFT stage), nothing else."""
        import os

        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"init_from='{ckpt_path}' does not exist; point it at a .ckpt file or an HF directory.")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
        weights = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
        if not weights:
            raise ValueError(f"init_from='{ckpt_path}' holds no policy weights; is it a tirl checkpoint?")
        if is_lora(self.policy) and not any("lora_" in k for k in weights):
            self.policy.get_base_model().load_state_dict(weights, strict=True)   # SFT was full, RL adds an adapter
        else:
            self.policy.load_state_dict(weights, strict=True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def configure_optimizers(self):
        m = self.method_cfg
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=m.lr, weight_decay=m.weight_decay, betas=tuple(m.betas))
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(m.lr_schedule, m.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Exact resume: Lightning restores weights, optimiser, scheduler, step and datamodule state; the RNG streams
    # that drive sampling are ours to carry.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tirl_rng"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        checkpoint["tirl_lora"] = is_lora(self.policy)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        # Applied just before the first training step rather than now: between loading and that step Lightning
        # builds a new DataLoader iterator, which draws from the global torch RNG and would shift sampling.
        self._resume_rng = checkpoint.get("tirl_rng")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        forget_step_metrics(self.trainer)   # a step's metrics row holds only what that step logs
        rng = getattr(self, "_resume_rng", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._resume_rng = None

    def export_hf(self, out_dir: str, merge_lora: bool = True) -> str:
        """Write an HF-format directory loadable by ``from_pretrained`` (LoRA merged, or the adapter alone)."""
        model = self.policy
        if is_lora(model) and merge_lora:
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        return out_dir
