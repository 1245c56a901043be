"""What SFT and RL modules share: the policy, its optimiser and schedule, and exact-resume state."""

from __future__ import annotations

import logging
import math
import random
import warnings
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn

from tirl.config.schema import MethodConfig, ModelConfig
from tirl.logging.step_metrics import forget_step_metrics
from tirl.models.load import (
    LoraSpec,
    ModelNotFoundError,
    init_kind,
    load_policy,
    load_weights,
    read_checkpoint,
)
from tirl.models.reference import is_lora
from tirl.models.sharding import DTYPES, is_sharded, shard_policy, sharding_mesh

log = logging.getLogger(__name__)


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

    def load_start_policy(self) -> torch.nn.Module:
        """The policy as the run starts: the model config's weights, or ``init_from``'s (``tirl.models.load``)."""
        m = self.model_cfg
        lora = None
        if m.lora.enabled:
            lora = LoraSpec(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                            target_modules=list(m.lora.target_modules))
        return load_policy(
            m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code, gradient_checkpointing=m.gradient_checkpointing, lora=lora,
            seed=m.seed, init_from=self.init_from,
        )

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = self.load_start_policy()
        # copies (a full fine-tune's KL reference) are taken from the whole policy, before it is split over ranks
        frozen = self.frozen_copies()
        mesh = getattr(self, "_device_mesh", None)   # set by Lightning's ModelParallelStrategy (hardware=fsdp)
        unsharded = [model for model in (self.policy, *frozen) if not is_sharded(model)]
        if mesh is not None and unsharded:
            self.shard(unsharded, mesh["data_parallel"])
        if self.fitting():
            # from_pretrained hands the policy over in eval mode and Lightning keeps each module's mode: without this
            # it would train in eval mode, where transformers' gradient checkpointing is off (RL has dropout off
            # anyway). Only this module itself is flagged, not all children: a frozen KL reference copy stays eval.
            self.training = True
            self.policy.train()

    def fitting(self) -> bool:
        """Whether a Trainer runs this module's ``fit`` now."""
        return self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING

    def frozen_copies(self) -> list[torch.nn.Module]:
        """Frozen copies of the policy the run needs (made here, from the unsharded policy); sharded like it."""
        return []

    def shard(self, models: list[torch.nn.Module], data_parallel) -> None:
        """FSDP2 for ``models`` (the policy first) over ``data_parallel`` (Lightning's mesh) as ``model.fsdp`` says
        (``tirl.models.sharding``). CPU ranks compute in float32: bf16 all-gathers are for GPUs (on a CPU they are
        slow and change the numbers)."""
        f = self.model_cfg.fsdp
        param_dtype = DTYPES[f.param_dtype]
        if data_parallel.device_type == "cpu" and param_dtype != torch.float32:
            if self.global_rank == 0 and not getattr(self, "_cpu_dtype_said", False):   # expected on CPU ranks: once
                log.info("model.fsdp.param_dtype=%s is for GPUs; CPU ranks shard and compute in float32.", f.param_dtype)
                self._cpu_dtype_said = True
            param_dtype = torch.float32
        mesh = sharding_mesh(data_parallel, f.sharding, self._trainer.num_nodes if self._trainer is not None else 1)
        log.info("FSDP2 shards the policy over mesh (%s), %s compute, %s gradient reduction",
                 ", ".join(f"{n}={s}" for n, s in zip(mesh.mesh_dim_names, mesh.shape)), param_dtype, f.reduce_dtype)
        for model in models:
            shard_policy(model, mesh, param_dtype=param_dtype, reduce_dtype=DTYPES[f.reduce_dtype],
                         reshard_after_forward=f.reshard_after_forward, cpu_offload=f.cpu_offload)

    def on_fit_start(self) -> None:
        # The frozen reference copy (a full fine-tune's KL term) is in eval mode on purpose: Lightning's warning about
        # modules in eval mode is silenced for exactly that many modules, so any other eval-mode module still warns.
        frozen = sum(not module.training for module in self.modules())
        if frozen:
            warnings.filterwarnings("ignore", message=rf"Found {frozen} module\(s\) in eval mode at the start of training")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def configure_optimizers(self):
        m = self.method_cfg
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=m.lr, weight_decay=m.weight_decay, betas=tuple(m.betas))
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(m.lr_schedule, m.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Exact resume: Lightning restores weights, optimiser, scheduler, step and datamodule state; the RNG streams
    # that drive sampling are ours to carry. Every rank samples with its own streams (they drift apart as ranks draw
    # different numbers of tokens), while Lightning writes the non-tensor part of a checkpoint from rank 0 alone
    # (the .ckpt under DDP, meta.pt of a sharded directory), so each rank's streams are gathered into it.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from tirl.modules.collectives import gather_objects

        checkpoint["tirl_rng"] = gather_objects({
            "torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })
        checkpoint["tirl_lora"] = is_lora(self.policy)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        # Applied just before the first training step rather than now: between loading and that step Lightning
        # builds a new DataLoader iterator, which draws from the global torch RNG and would shift sampling.
        from tirl.modules.collectives import own_entry

        rng = checkpoint.get("tirl_rng")
        # a list since per-rank streams are saved (one dict per rank); one dict in checkpoints written before
        self._resume_rng = own_entry(rng, self.global_rank, "RNG state") if isinstance(rng, list) else rng

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

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, map_location=None, tokenizer=None, **kwargs):
        """The module a tirl ``.ckpt`` (a file, or a sharded run's directory, read in this one process) was saved
        from, with its policy weights (for export, evaluation, inspection).

        Lightning's own ``load_from_checkpoint`` would pass the plain dicts tirl saves as hyper-parameters (so a
        checkpoint loads with ``weights_only=True``) to a constructor expecting typed configs; this rebuilds them.
        The policy's structure comes from the run's ``model`` config (and its ``init_from`` when that is an HF
        directory still on disk); every weight, base included, comes from the checkpoint.
        ``tokenizer``: defaults to ``model.name_or_path``'s; ``kwargs`` override constructor arguments.
        Raises ModelNotFoundError for a missing or foreign file, or weights that do not fit the model."""
        import inspect

        from omegaconf import OmegaConf

        from tirl.config.validate import SCHEMAS
        from tirl.models.load import load_tokenizer

        weights, _, hparams = read_checkpoint(checkpoint_path)
        params = inspect.signature(cls.__init__).parameters
        args = {group: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), hparams.get(group) or {}))
                for group in ("method", "model", "rollout", "sandbox") if group in params}
        model_cfg = args["model"]
        start = hparams.get("init_from")
        try:
            structure = start if start and init_kind(start) == "hf" else None
        except ModelNotFoundError:   # the HF directory it started from is gone: the architecture is the base model's
            structure = None
        if tokenizer is None:
            tokenizer = load_tokenizer(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        module = cls(**{**args, "tokenizer": tokenizer, "init_from": structure, **kwargs})
        module.configure_model()
        load_weights(module.policy, weights, checkpoint_path, structure or model_cfg.name_or_path)
        module.init_from = start
        return module.to(map_location) if map_location is not None else module

    def adapter_base(self) -> str:
        """The base model a LoRA adapter of this run goes onto: ``model.name_or_path``, or ``init_from`` when that
        is an HF directory. Raises ValueError when the base exists nowhere on disk (``init_from`` was a .ckpt or an
        adapter, merged into the base at the start of this run)."""
        if not self.init_from:
            return self.model_cfg.name_or_path
        try:
            if init_kind(self.init_from) == "hf":
                return str(self.init_from)
        except ModelNotFoundError:
            pass
        raise ValueError(f"This run's base weights are init_from='{self.init_from}' merged, which no HF directory "
                         f"holds, so its adapter alone cannot rebuild it; export with merge_lora=true.")

    def export_hf(self, out_dir: str, merge_lora: bool = True) -> str:
        """Write an HF-format directory loadable by ``from_pretrained``, tokenizer included: the model (a LoRA
        adapter merged in), or with ``merge_lora=False`` the adapter alone, its ``base_model_name_or_path`` naming
        ``adapter_base()`` (load it with ``init_from=<dir>`` or peft's ``AutoPeftModelForCausalLM``).
        Raises ValueError for an adapter-only export whose base exists nowhere (see ``adapter_base``)."""
        import copy
        import json
        from pathlib import Path

        model = self.policy
        if is_lora(model) and not merge_lora:
            base = self.adapter_base()
            model.save_pretrained(out_dir)
            cfg_path = Path(out_dir) / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = base
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        else:
            if is_lora(model):
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        return out_dir
