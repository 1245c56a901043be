"""GRPO as a LightningModule: the orchestration of one RL step. The math is in ``tirl.rl.core``.

A step: take prompts → roll out G samples each (no grad, eval mode, through ``tirl.rollout``) → score them with
the configured reward callable → group advantages → (optional, by config) D-CORE's entropy shaping, THOR's
episode filter with dynamic sampling and its step-level samples → ``ppo_epochs`` passes of micro-batch
updates whose token-mean is normalised by the global token count → clip, step, schedule → metrics.

D-CORE and THOR are this module with parts switched on (``tirl.modules.dcore``, ``tirl.modules.thor``), so any
combination — DA-GRPO shaping with THOR's step level, say — is a config change.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from dataclasses import asdict

import torch
import torch.distributed as dist

from tirl.config.schema import MethodConfig, ModelConfig, RolloutConfig, SandboxConfig
from tirl.data.prompts import PromptEncoder
from tirl.logging.step_metrics import log_step
from tirl.models.load import disable_dropout
from tirl.models.reference import make_frozen_reference, reference_model
from tirl.modules.policy import PolicyModule
from tirl.modules.rl_batch import Sample, SharedContextBatch, TensorBatch, collate_samples
from tirl.rewards import ACCURACY_REWARDS, get_reward
from tirl.rl import core
from tirl.rollout.backend import CACHE, HFBackend, has_plain_kv_cache, returned_cache
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import Trajectory
from tirl.tools.calls import parse_calls
from tirl.tools.sandbox import build_sandbox
from tirl.tools.text_format import split_reasoning

log = logging.getLogger(__name__)


def record_kind(record: dict) -> str | None:
    """What a held-out prompt's accuracy is broken down by: its BFCL category, else its math level."""
    if record.get("category"):
        return str(record["category"])
    if record.get("level") is not None:
        return f"level{record['level']}"
    return None


# tasks whose tool use is text graded against a gold answer, never run: the sandbox is not theirs
SANDBOX_FREE_TASKS = ("toolcall",)


def count_function_calls(response: str) -> int:
    """Function calls in a response's final answer (the text after ``</think>``); 0 when it is not a call list."""
    calls = parse_calls(split_reasoning(response)[1])
    return len(calls) if isinstance(calls, list) else 0


def sandbox_from_config(s: SandboxConfig):
    if s.kind == "fusion":
        return build_sandbox("fusion", url=s.url, timeout_s=s.timeout_s)
    return build_sandbox(s.kind, workers=s.workers, timeout_s=s.timeout_s, memory_mb=s.memory_mb,
                         max_output_bytes=s.max_output_bytes, require_isolation=s.require_isolation)


def make_backend(cfg: RolloutConfig, policy, tokenizer):
    if cfg.backend == "hf":
        return HFBackend(policy, tokenizer)
    if cfg.backend == "vllm":
        from tirl.rollout.vllm import VLLMBackend

        return VLLMBackend.colocated(policy, tokenizer, cfg)
    raise ValueError(f"rollout.backend='{cfg.backend}' must be 'hf' or 'vllm'.")


class GRPOModule(PolicyModule):
    def __init__(self, method: MethodConfig, model: ModelConfig, rollout: RolloutConfig, sandbox: SandboxConfig,
                 tokenizer, init_from: str | None = None):
        super().__init__(method, model, tokenizer, init_from)
        self.rollout_cfg, self.sandbox_cfg = rollout, sandbox
        self.hparams.update(rollout=asdict(rollout), sandbox=asdict(sandbox))
        self.automatic_optimization = False
        self.prompts = PromptEncoder(tokenizer, model.enable_thinking, model.tool_prompt)
        self.reward_fn = get_reward(method.reward.name, **method.reward.kwargs)
        self.accuracy_fn = get_reward(ACCURACY_REWARDS.get(method.reward.name, method.reward.name))
        # the method parts live with their method; imported here because those files subclass this module
        from tirl.modules.thor import EpisodeFilter, StepLevel

        self.episode_filter = EpisodeFilter(method.episode_filter) if method.episode_filter.enabled else None
        self.step_level = StepLevel(method.step_level) if method.step_level.enabled else None
        self.frozen_ref = None
        self.share_contexts = True   # read a context shared by several samples once per micro-batch
        self.sandbox = None
        self._val_outputs: list[dict] = []

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str) -> None:
        self.configure_model()
        if stage == "fit":
            # RL runs with every dropout off (LoRA's and the model config's), as verl does: old log-probs and the
            # reference come from eval-mode forwards, so a train-mode dropout in the update alone would move the
            # ratio off 1 and clip tokens before any weight has changed. SFT keeps its dropout (it has no ratio).
            was = disable_dropout(self.policy)
            if was:
                log.info("RL turns dropout off (ratio and KL need one deterministic policy): %s",
                         ", ".join(f"{k}={v}" for k, v in sorted(was.items())[:4]) + (" …" if len(was) > 4 else ""))
        if stage == "fit" and self.frozen_ref is None:
            self.frozen_ref = make_frozen_reference(self.policy, self.method_cfg.loss.kl_coef)
        if self.sandbox is None:
            self.sandbox = sandbox_from_config(self.sandbox_cfg)

    def teardown(self, stage: str) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    @property
    def tool_loop(self) -> ToolLoop:
        return ToolLoop(make_backend(self.rollout_cfg, self.policy, self.tokenizer), self.sandbox, self.tokenizer,
                        self.rollout_cfg)

    # ------------------------------------------------------------------ rollout and reward
    def encode_prompt(self, record: dict) -> list[int]:
        """The record's prompt ids, left-truncated to rollout.max_prompt_tokens (``tirl.data.prompts``)."""
        return self.prompts.ids(record, self.rollout_cfg.max_prompt_tokens)

    def response_text(self, t: Trajectory) -> str:
        """The response as the reward sees it: special tokens kept (<think>), the closing end-of-turn dropped."""
        ids = t.response_ids
        if ids and ids[-1] in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def reward_text(self, t: Trajectory) -> str:
        """What the rewards read: the model-written spans only (a tool output's ``\\boxed{}``, ``</think>`` or
        repeated lines are not the model's), special tokens kept, the closing end-of-turn dropped."""
        return t.model_text(self.tokenizer, (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id))

    def rollout_groups(self, records: list[dict], group_size: int, loop: ToolLoop | None = None) -> list[Trajectory]:
        prompts, metas = [], []
        for gi, r in enumerate(records):
            ids = self.encode_prompt(r)
            for _ in range(group_size):
                prompts.append(ids)
                metas.append({"group": gi, "id": r.get("id"), "answer": r.get("answer"), "task": r.get("task")})
        return (loop or self.tool_loop).run(prompts, metas)

    def score(self, trajs: list[Trajectory], records: list[dict]) -> tuple[list[float], list[float]]:
        texts = [self.reward_text(t) for t in trajs]
        # the columns a reward needs besides the answer: BFCL's checker types arguments by the offered functions'
        # docs and reads relevance from the category
        columns = {key: [records[t.meta["group"]].get(key) for t in trajs] for key in ("answer", "tools", "category")}
        rewards = [float(x) for x in self.reward_fn(texts, **columns)]
        correct = [float(x) for x in self.accuracy_fn(texts, **columns)]
        return rewards, correct

    # ------------------------------------------------------------------ building the training batch
    def episode_samples(self, trajs: list[Trajectory], rewards: list[float], G: int) -> tuple[list[Sample], dict]:
        """Group-normalised advantages (over survivors of THOR's filter when it is on) → one Sample per trajectory."""
        keep = [True] * len(trajs)
        stats: dict = {}
        if self.episode_filter is not None:
            keep, rewards, stats = self.episode_filter(trajs, rewards, G, self.tokenizer)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, t in enumerate(trajs):
            if keep[i]:
                groups[t.meta["group"]].append(i)
        samples = []
        a = self.method_cfg.advantage
        if a.scale == "batch":
            kept = [i for idx in groups.values() for i in idx]
            batch_std = torch.tensor([rewards[i] for i in kept]).std() if len(kept) > 1 else torch.tensor(0.0)
        for idx in groups.values():
            r = torch.tensor([rewards[i] for i in idx], dtype=torch.float64)
            adv = core.group_advantages(r, len(idx), scale="none" if a.scale == "batch" else a.scale, eps=a.eps)
            if a.scale == "batch":
                adv = adv / (batch_std + a.eps)
            for i, ai in zip(idx, adv.tolist()):
                t = trajs[i]
                samples.append(Sample(t.prompt_ids, t.response_ids, t.model_mask, t.logprobs, t.entropies, ai))
        stats["groups_kept"] = len(groups)
        return samples, stats

    # ------------------------------------------------------------------ the update
    def global_counts(self, batch: TensorBatch, level: str) -> tuple[float, float]:
        """Token and sequence counts of one loss level over the whole batch and all ranks (micro-batch invariance)."""
        rows = [i for i, lv in enumerate(batch.level) if lv == level]
        mask = batch.mask[rows] if rows else batch.mask[:0]
        counts = torch.tensor([mask.sum().item(), float((mask.sum(-1) > 0).sum().item())], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        return max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)

    @staticmethod
    def sequence_logits(model, tok: TensorBatch, shared: SharedContextBatch | None) -> torch.Tensor:
        """Next-token logits lined up with the per-token tensors of ``tok`` (``shared.tokens`` when contexts are
        shared; else a response window, whose input ids are the whole sequences)."""
        if shared is None:
            keep = tok.mask.shape[1] + 1
            return model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, logits_to_keep=keep).logits[:, :-1]
        ctx = model(input_ids=shared.ctx_ids, attention_mask=shared.ctx_attn, position_ids=shared.ctx_pos,
                    use_cache=True, logits_to_keep=1)
        cache = returned_cache(ctx)
        cache.batch_select_indices(shared.row_ctx)      # indexing, so gradients from every row add up in the context
        out = model(input_ids=shared.tokens.input_ids, attention_mask=shared.attention_mask,
                    position_ids=shared.position_ids, use_cache=True, **{CACHE: cache})
        return torch.cat([ctx.logits[shared.row_ctx], out.logits[:, :-1]], dim=1)              # [N, R, V]

    def can_share_contexts(self) -> bool:
        """Reading a shared context once needs a plain full-attention transformers cache the gradient can flow
        through (not with gradient checkpointing, which drops the cache in training)."""
        if not self.share_contexts:
            return False
        policy = self.policy
        checkpointing = getattr(policy, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(policy, "is_gradient_checkpointing", False)
        if getattr(self, "_plain_cache", None) is None:
            self._plain_cache = has_plain_kv_cache(policy)
        return self._plain_cache and not checkpointing

    def micro_batch_loss(self, mb: TensorBatch, counts: dict[str, tuple[float, float]]) -> tuple[torch.Tensor, dict]:
        loss_cfg = self.method_cfg.loss
        shared = mb.shared_contexts() if self.can_share_contexts() else None
        # per-token tensors: the continuations' (shared contexts), or from the first column any row has a loss
        # token in (prompts cost no lm_head either way)
        tok = shared.tokens if shared is not None else mb.response_window()
        temperature = self.rollout_cfg.temperature or 1.0
        logits = self.sequence_logits(self.policy, tok, shared)                                 # [B, W, V]
        logp = core.token_logprobs(logits, tok.targets, temperature=temperature)
        loss_tok, metrics = core.policy_loss(logp, tok.old_logp, tok.advantages, tok.mask, loss_cfg.clip_low,
                                             loss_cfg.clip_high, loss_cfg.dual_clip)
        if loss_cfg.kl_coef > 0:
            with reference_model(self.policy, self.frozen_ref) as ref, torch.no_grad():
                ref_logits = self.sequence_logits(ref, tok, shared)
                ref_logp = core.token_logprobs(ref_logits, tok.targets, temperature=temperature)
            kl = core.kl_penalty(logp, ref_logp, loss_cfg.kl_kind)
            loss_tok = loss_tok + loss_cfg.kl_coef * kl
            metrics["kl"] = core.masked_mean(kl.detach(), tok.mask)
        if loss_cfg.nll_coef > 0:
            loss_tok = loss_tok + loss_cfg.nll_coef * core.nll_on_positive(logp, tok.advantages, tok.mask)
        total = logp.new_zeros(())
        # L = L_episode + w * L_step, each normalised over its own tokens (THOR: w = 1)
        weights = {"episode": 1.0, "step": self.method_cfg.step_level.weight}
        for level in ("episode", "step"):
            rows = torch.tensor([lv == level for lv in tok.level], device=tok.mask.device)
            if not rows.any():
                continue
            n_tok, n_seq = counts[level]
            total = total + weights[level] * core.aggregate(loss_tok[rows], tok.mask[rows], loss_cfg.agg, num_tokens=n_tok,
                                           num_seqs=n_seq, norm_len=loss_cfg.norm_len or self.rollout_cfg.max_total_tokens)
        return total, metrics

    def _all_reduce(self, value: float, op: str = "sum") -> float:
        if not (dist.is_available() and dist.is_initialized()):
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.item()

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each rank saw its own share of the prompts: average every metric over ranks so ``train/*`` describes
        the whole batch. Ranks may hold different keys (a filter reason seen on one rank only), so the key set is
        agreed first and a missing key counts as 0 on that rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return metrics
        key_sets: list = [None] * dist.get_world_size()
        dist.all_gather_object(key_sets, sorted(metrics))
        keys = sorted(set().union(*key_sets))
        t = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, (t / dist.get_world_size()).tolist()))

    def update(self, batch: TensorBatch) -> dict:
        m = self.method_cfg
        opt = self.optimizers()
        counts = {lv: self.global_counts(batch, lv) for lv in ("episode", "step")}
        logs: dict[str, list[float]] = defaultdict(list)
        order = list(range(len(batch)))
        chunks = [order[s:s + m.micro_batch_size] for s in range(0, len(order), m.micro_batch_size)]
        # every rank must run as many backward passes as the busiest one (DDP syncs gradients in each), so
        # ranks with fewer samples add zero-weighted passes
        n_passes = int(self._all_reduce(len(chunks), "max"))
        for _ in range(m.ppo_epochs):
            opt.zero_grad(set_to_none=True)
            for k in range(n_passes):
                idx, weight = (chunks[k], 1.0) if k < len(chunks) else (chunks[0], 0.0)
                mb = batch.select(idx).to(self.device)
                loss, metrics = self.micro_batch_loss(mb, counts)
                # each rank's loss is already divided by the token count of ALL ranks; DDP/FSDP then average
                # gradients over ranks, so scale back up to make the result the global token-mean's gradient
                self.manual_backward(loss * (weight * self.trainer.world_size))
                if weight:
                    logs["loss"].append(loss.item())
                    w = mb.mask.sum().item()
                    for key, v in metrics.items():
                        logs[key].append(float(v) * w)
                    logs["_w"].append(w)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), m.max_grad_norm)
            logs["grad_norm"].append(float(grad_norm))
            self.optimizer_step_and_schedule(opt)
        wsum = max(sum(logs.pop("_w", [])), 1.0)
        out = {"loss": sum(logs.pop("loss", [])) / m.ppo_epochs, "grad_norm": sum(logs.pop("grad_norm")) / m.ppo_epochs}
        out.update({k: sum(v) / wsum / m.ppo_epochs for k, v in logs.items()})
        return out

    def optimizer_step_and_schedule(self, opt) -> None:
        """One optimizer step and one schedule step. Lightning's ``global_step`` (hence ``trainer.max_steps`` and the
        schedule's length) counts optimizer steps, so an RL step with ``ppo_epochs`` = k is k of them, skipped or not."""
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def empty_batch(self) -> TensorBatch:
        """One all-padding sequence with no loss tokens: lets a rank with nothing to learn join the collectives."""
        pad = self.tokenizer.pad_token_id
        return collate_samples([Sample([pad, pad], [pad], [0], [0.0], [0.0], 0.0)], pad)

    # ------------------------------------------------------------------ Lightning hooks
    def collect(self, records: list[dict]) -> tuple[list[Trajectory], list[float], list[float], list[Sample], dict]:
        """Roll out, score and turn into samples; refill dropped groups (dynamic sampling) up to the round limit."""
        m = self.method_cfg
        G, want = m.group_size, len(records)
        records = list(records)
        loop = self.tool_loop
        trajs = self.rollout_groups(records, G, loop)
        rewards, correct = self.score(trajs, records)
        samples, stats = self.episode_samples(trajs, rewards, G)
        rounds = 1
        while self.episode_filter is not None and m.episode_filter.dynamic_sampling and \
                stats["groups_kept"] < want and rounds < m.episode_filter.max_sampling_rounds:
            extra = self.refill_prompts(want - stats["groups_kept"])
            if not extra:
                break
            offset = len(records)
            records += extra
            more = self.rollout_groups(extra, G, loop)
            for t in more:
                t.meta["group"] += offset
            r2, c2 = self.score(more, records)
            trajs, rewards, correct = trajs + more, rewards + r2, correct + c2
            samples, stats = self.episode_samples(trajs, rewards, G)
            rounds += 1
        stats = {f"filter/{k}": v for k, v in stats.items()}
        stats["sampling_rounds"] = rounds
        if self.step_level is not None:
            step_samples, step_stats = self.step_level(trajs, loop, self.sandbox, self.tokenizer)
            samples += step_samples
            stats.update({f"step_level/{k}": v for k, v in step_stats.items()})
        return trajs, rewards, correct, samples, stats

    def training_step(self, batch: list[dict], batch_idx: int):
        m = self.method_cfg
        trajs, rewards, correct, samples, stats = self.collect(list(batch))
        metrics = self.rollout_metrics(trajs, rewards, correct)
        metrics.update(stats)
        tb = None
        if self._all_reduce(len(samples)) > 0:   # decided on the global count so every rank agrees
            tb = collate_samples(samples, self.tokenizer.pad_token_id) if samples else self.empty_batch()
            if m.shaping.kind != "none":
                from tirl.modules.dcore import shape_advantages

                tb.advantages, shaped = shape_advantages(tb.advantages, tb.entropy, tb.mask, m.shaping)
                metrics["shaping/shaped_token_frac"] = shaped
        # With every advantage exactly 0 and no KL term the gradient is exactly 0, but an Adam step would still move
        # the weights along its momentum; such a step is counted without touching the optimizer.
        if tb is not None and (m.loss.kl_coef > 0 or self._all_reduce(float(tb.advantages.abs().sum() > 0)) > 0):
            metrics.update(self.update(tb))
            metrics["skipped_update"] = 0.0
        else:   # nothing to learn from: keep step/schedule counters moving so runs stay comparable
            metrics["skipped_update"] = 1.0
            opt = self.optimizers()
            opt.zero_grad(set_to_none=True)
            for _ in range(m.ppo_epochs):   # no gradients: parameters are untouched, but the steps count
                self.optimizer_step_and_schedule(opt)
        metrics = self.mean_over_ranks(metrics)
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, prog_bar=False, on_step=True,
                      batch_size=len(batch))
        self.log("train/reward", metrics["reward_mean"], prog_bar=True, batch_size=len(batch))
        self.log_samples("train", trajs, rewards, correct)

    def refill_prompts(self, n: int) -> list[dict]:
        dm = getattr(self.trainer, "datamodule", None)
        return dm.refill_prompts(n) if dm is not None and hasattr(dm, "refill_prompts") else []

    def uses_sandbox(self, t: Trajectory) -> bool:
        """Whether the rollout could run code: tool rounds are on and its task executes code (math), not function
        calling, whose calls are text graded against the gold."""
        return self.rollout_cfg.max_tool_rounds > 0 and t.meta.get("task") not in SANDBOX_FREE_TASKS

    def rollout_metrics(self, trajs: list[Trajectory], rewards: list[float], correct: list[float]) -> dict:
        """Per-step rollout statistics. Names say what they count: ``sandbox_*`` over rollouts that could run code
        (absent when none could), ``function_calls_per_sample`` over function-calling rollouts (absent otherwise)."""
        r = torch.tensor(rewards)
        model_tokens = [sum(t.model_mask) for t in trajs]
        ent = [e for t in trajs for e, mm in zip(t.entropies, t.model_mask) if mm]
        out = {
            "reward_mean": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
            "acc": sum(correct) / max(len(correct), 1),
            "response_len": sum(len(t.response_ids) for t in trajs) / max(len(trajs), 1),
            "model_tokens": sum(model_tokens) / max(len(trajs), 1),
            "entropy": sum(ent) / max(len(ent), 1),
            "truncated_frac": sum(t.stop_reason == "length" for t in trajs) / max(len(trajs), 1),
        }
        coded = [t for t in trajs if self.uses_sandbox(t)]
        if coded:
            n_runs = sum(t.num_calls for t in coded)
            out["sandbox_calls_per_sample"] = n_runs / len(coded)
            out["sandbox_pass_rate"] = (sum(c.passed for t in coded for c in t.calls) / n_runs) if n_runs else 0.0
            if self.rollout_cfg.self_correction.enabled:
                out["corrections_per_sample"] = sum(t.corrections for t in coded) / len(coded)
        calling = [t for t in trajs if t.meta.get("task") in SANDBOX_FREE_TASKS]
        if calling:
            out["function_calls_per_sample"] = sum(count_function_calls(self.response_text(t)) for t in calling) / len(calling)
        return out

    def validation_step(self, batch: list[dict], batch_idx: int):
        self._val_outputs += self.evaluate_records(batch)

    def test_step(self, batch: list[dict], batch_idx: int):
        self._val_outputs += self.evaluate_records(batch)

    def evaluate_records(self, records: list[dict], temperature: float | None = None,
                         samples: int | None = None) -> list[dict]:
        """Tool-integrated rollouts of held-out prompts (greedy, or ``samples`` at ``temperature`` = Avg@k),
        scored by the accuracy reward (exact answer / exact calls)."""
        m = self.method_cfg
        temperature = m.val_temperature if temperature is None else temperature
        samples = (m.val_samples if samples is None else samples) if temperature > 0 else 1
        cfg = RolloutConfig(**{**self.rollout_cfg.__dict__, "temperature": temperature})
        loop = ToolLoop(make_backend(cfg, self.policy, self.tokenizer), self.sandbox, self.tokenizer, cfg)
        trajs = self.rollout_groups(records, samples, loop)
        rewards, correct = self.score(trajs, records)
        self.log_samples("val", trajs, rewards, correct)
        return [{"correct": c, "reward": r, "len": len(t.response_ids), "kind": record_kind(records[t.meta["group"]])}
                for t, r, c in zip(trajs, rewards, correct)]

    def _epoch_end(self, prefix: str) -> None:
        outs, self._val_outputs = self._val_outputs, []
        if not outs:
            return
        n = len(outs)
        self.log(f"{prefix}/acc", sum(o["correct"] for o in outs) / n, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/reward", sum(o["reward"] for o in outs) / n, sync_dist=True)
        self.log(f"{prefix}/response_len", sum(o["len"] for o in outs) / n, sync_dist=True)
        for kind, acc in self.accuracy_by_kind(outs).items():
            self.log(f"{prefix}/acc/{kind}", acc)   # already the same on every rank

    def accuracy_by_kind(self, outs: list[dict]) -> dict[str, float]:
        """Accuracy per BFCL category or math level, over all ranks: a single number can hide a trade, e.g. RL
        that learns to call functions more often wins on `simple` what it loses on `irrelevance`. Ranks may hold
        different kinds, so sums and counts go through `mean_over_ranks` (its key agreement) and are divided after."""
        stats: dict[str, float] = defaultdict(float)
        for o in outs:
            if o.get("kind") is not None:
                stats[f"correct/{o['kind']}"] += o["correct"]
                stats[f"n/{o['kind']}"] += 1
        stats = self.mean_over_ranks(dict(stats))
        kinds = sorted(k.split("/", 1)[1] for k in stats if k.startswith("n/") and stats[k] > 0)
        return {kind: stats[f"correct/{kind}"] / stats[f"n/{kind}"] for kind in kinds}

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ------------------------------------------------------------------ samples table
    def log_samples(self, split: str, trajs: list[Trajectory], rewards: list[float], correct: list[float]) -> None:
        k = self.method_cfg.log_samples
        # rank 0 only, as W&B's log_table and the CSV metrics are: under DDP every rank appending to one CSV raced
        # on its header and doubled the rows
        if not k or self._trainer is None or self.trainer.sanity_checking or self.global_rank != 0:
            return
        # the step number of the metrics.csv row this step's (or this validation's) metrics are written in
        step = log_step(self.trainer)
        rows = [[step, t.meta.get("id"), self.response_text(t), r, c, t.num_calls, t.failed_calls]
                for t, r, c in list(zip(trajs, rewards, correct))[:k]]
        cols = ["step", "id", "response", "reward", "correct", "calls", "failed_calls"]
        for logger in self.loggers:
            if hasattr(logger, "log_table"):     # W&B
                logger.log_table(key=f"{split}/samples", columns=cols, data=rows)
            elif getattr(logger, "log_dir", None):
                path = os.path.join(logger.log_dir, f"{split}_samples.csv")
                new = not os.path.exists(path)
                with open(path, "a", newline="") as f:
                    w = csv.writer(f)
                    if new:
                        w.writerow(cols)
                    w.writerows(rows)
