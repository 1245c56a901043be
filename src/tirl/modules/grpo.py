"""GRPO as a LightningModule: the orchestration of one RL step. The math is in ``tirl.rl.core``.

A step: take prompts → roll out G samples each (no grad, eval mode, through ``tirl.rollout``) → score them with
the configured reward callable → group advantages → (optional, by config) D-CORE's entropy shaping, THOR's
episode filter with dynamic sampling and its step-level samples → (``old_log_probs=recompute``) the trainer's
own old log-probs → the round's optimizer steps (``tirl.modules.round_update``: mini-batches of whole groups,
micro-batches normalised by the mini-batch's global token count) → metrics.

D-CORE and THOR are this module with parts switched on by their presets (the parts are in ``tirl.methods``;
``tirl.modules.dcore``/``thor`` only name the presets), so any combination — DA-GRPO shaping with THOR's step
level, say — is a config change. Collectives are in ``tirl.modules.collectives``, the shared-context forward in
``tirl.models.forward``, validation outcomes in ``tirl.modules.validation``, the samples table is a callback
(``tirl.callbacks.SamplesTable``).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict

import torch

from tirl.callbacks.samples_table import SamplesTable
from tirl.config.schema import MethodConfig, ModelConfig, RolloutConfig, SandboxConfig
from tirl.config.tasks import REWARD_TASKS
from tirl.data.prompts import PromptEncoder
from tirl.data.sources import DataError
from tirl.methods.advantages import episode_samples
from tirl.methods.episode_filter import EpisodeFilter
from tirl.methods.shaping import shape_advantages
from tirl.methods.step_level import StepLevel
from tirl.models.forward import is_checkpointing, packed_logprobs, sequence_logits
from tirl.models.kv_cache import has_plain_kv_cache
from tirl.models.load import disable_dropout
from tirl.models.reference import freeze, make_frozen_reference, needs_frozen_reference, reference_model
from tirl.models.sharding import full_weights, is_sharded
from tirl.modules import collectives
from tirl.modules.policy import PolicyModule
from tirl.modules.round_update import RoundUpdate
from tirl.modules.validation import accuracy_by_kind, heldout_means, heldout_outcomes, is_padding
from tirl.rewards import ACCURACY_REWARDS, get_reward
from tirl.rl import core
from tirl.rl.batch import PackedBatch, Sample, SharedContextBatch, TensorBatch, collate_samples, pack_rows
from tirl.rl.schedule import check_world_size
from tirl.rollout.backend import make_backend
from tirl.rollout.metrics import rollout_metrics
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import Trajectory
from tirl.tools.sandbox import sandbox_from_config

log = logging.getLogger(__name__)


def check_records_task(records: list[dict], reward: str) -> None:
    """Refuse prompts of another task than the run's reward scores (one reward per run, picked from the first
    record's ``task``): a tool-call prompt graded by the math reward would silently score 0. Records without a
    ``task`` and rewards of no known task pass. Raises DataError naming the prompt and what to change."""
    reward_task = REWARD_TASKS.get(reward)
    for r in records:
        if reward_task is not None and r.get("task") not in (None, reward_task):
            raise DataError(f"Prompt {r.get('id')!r} has task {r['task']!r}, but this run's reward '{reward}' scores "
                            f"{reward_task} answers; keep one task per RL file (its first record's task picks the "
                            f"reward for all) and train each task in a run of its own.")


class GRPOModule(RoundUpdate, PolicyModule):
    def __init__(self, method: MethodConfig, model: ModelConfig, rollout: RolloutConfig, sandbox: SandboxConfig,
                 tokenizer, init_from: str | None = None):
        super().__init__(method, model, tokenizer, init_from)
        self.rollout_cfg, self.sandbox_cfg = rollout, sandbox
        self.hparams.update(rollout=asdict(rollout), sandbox=asdict(sandbox))
        self.automatic_optimization = False
        self.prompts = PromptEncoder(tokenizer, model.enable_thinking, model.tool_prompt)
        self.reward_fn = get_reward(method.reward.name, **method.reward.kwargs)
        self.accuracy_fn = get_reward(ACCURACY_REWARDS.get(method.reward.name, method.reward.name))
        self.episode_filter = EpisodeFilter(method.episode_filter) if method.episode_filter.enabled else None
        self.step_level = StepLevel(method.step_level) if method.step_level.enabled else None
        self.frozen_ref = None
        self.share_contexts = True   # read a context shared by several samples once per micro-batch
        self._plain_cache: bool | None = None
        self.sandbox = None
        self._val_outputs: list[dict] = []
        self._val_seen = 0

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
        if stage == "fit" and getattr(self, "_trainer", None) is not None:   # ranks share rounds evenly
            check_world_size(self.method_cfg.rollout_batch_size, self.method_cfg.mini_batch_size, self.trainer.world_size)
        if stage == "fit" and self.frozen_ref is None:
            self.frozen_ref = make_frozen_reference(self.policy, self.method_cfg.loss.kl_coef)
        if self.sandbox is None:
            self.sandbox = sandbox_from_config(self.sandbox_cfg)

    def frozen_copies(self) -> list[torch.nn.Module]:
        """A full fine-tune's KL reference when fitting (``make_frozen_reference``): copied from the whole policy
        before sharding, then sharded like it, so no rank holds a second full model. When the policy is sharded
        already (a validation before fit sharded it) the start is loaded again instead: it has not trained yet."""
        kl_coef = self.method_cfg.loss.kl_coef
        if self.frozen_ref is None and self.fitting() and needs_frozen_reference(self.policy, kl_coef):
            self.frozen_ref = (freeze(self.load_start_policy()) if is_sharded(self.policy)
                               else make_frozen_reference(self.policy, kl_coef))
        return [self.frozen_ref] if self.frozen_ref is not None else []

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

    def sampling_weights(self):
        """The context rollouts run in: under FSDP with HF sampling, the policy's full weights gathered once for the
        whole phase (``tirl.models.sharding.full_weights``: no collective inside, so ranks may generate different
        numbers of tokens, tool rounds and resamples); vLLM samples from its own copy, so nothing is gathered."""
        return full_weights(self.policy) if self.rollout_cfg.backend == "hf" else nullcontext(self.policy)

    def rollout_groups(self, records: list[dict], group_size: int, loop: ToolLoop | None = None) -> list[Trajectory]:
        check_records_task(records, self.method_cfg.reward.name)   # before any rollout time is spent
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

    def episode_samples(self, trajs: list[Trajectory], rewards: list[float], G: int) -> tuple[list[Sample], dict]:
        return episode_samples(trajs, rewards, self.method_cfg.advantage, self.episode_filter, G, self.tokenizer)

    # ------------------------------------------------------------------ the update
    def global_counts(self, batch: TensorBatch, level: str) -> tuple[float, float]:
        """Token and sequence counts of one loss level over the whole batch and all ranks (micro-batch invariance)."""
        rows = [i for i, lv in enumerate(batch.level) if lv == level]
        mask = batch.response_mask[rows] if rows else batch.response_mask[:0]
        counts = torch.tensor([mask.sum().item(), float((mask.sum(-1) > 0).sum().item())], device=self.device)
        collectives.all_reduce_(counts)
        return max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)

    def can_share_contexts(self) -> bool:
        """Reading a shared context once needs a plain full-attention transformers cache the gradient can flow
        through (not with gradient checkpointing, which drops the cache in training)."""
        if not self.share_contexts:
            return False
        if self._plain_cache is None:
            self._plain_cache = has_plain_kv_cache(self.policy)
        return self._plain_cache and not is_checkpointing(self.policy)

    def micro_batch_reading(self, mb: TensorBatch) -> tuple[PackedBatch | None, SharedContextBatch | None]:
        """How a pass reads ``mb`` (both exact): packed (``method.packing``), unless reading each shared context once
        and padding the continuations reads fewer tokens (a long prompt shared by short, even responses); else
        padded, with shared contexts when the model allows. Returns (packed, shared), at most one not None.

        Under FSDP every forward is a collective, so all ranks take the same path: a shared context costs two
        forwards, packed or padded rows one, and a micro-batch on any rank without a shared context to read (an
        empty share, no two rows alike, packing cheaper) turns it off for all (one scalar all-reduce per pass)."""
        shared = mb.shared_contexts() if self.can_share_contexts() else None
        if self.method_cfg.packing and shared is not None and int(mb.attention_mask.sum()) <= shared.tokens_read():
            shared = None
        if is_sharded(self.policy) and self._all_reduce(float(shared is None), "max") > 0:
            shared = None
        if self.method_cfg.packing and shared is None:
            return pack_rows(mb), None
        return None, shared

    def micro_batch_loss(self, mb: TensorBatch, counts: dict[str, tuple[float, float]]) -> tuple[torch.Tensor, dict]:
        loss_cfg = self.method_cfg.loss
        temperature = self.rollout_cfg.temperature or 1.0
        packed, shared = self.micro_batch_reading(mb)
        if packed is not None:
            # one padding-free row; log-probs of the loss tokens only, put back in mb's [N, L-1] target layout
            tok = mb
            logp = packed.unpack(packed_logprobs(self.policy, packed, temperature)[0], mb.response_mask)
        else:
            # per-token tensors: the continuations' (shared contexts), or from the first column any row has a loss
            # token in (prompts cost no lm_head either way)
            tok = shared.tokens if shared is not None else mb.response_window()
            logits = sequence_logits(self.policy, tok, shared)                             # [B, W, V]
            logp = core.token_logprobs(logits, tok.targets, temperature=temperature)
        loss_tok, metrics = core.policy_loss(logp, tok.old_log_probs, tok.advantages, tok.response_mask,
                                             loss_cfg.clip_low, loss_cfg.clip_high, loss_cfg.dual_clip)
        if loss_cfg.kl_coef > 0:
            with reference_model(self.policy, self.frozen_ref) as ref, torch.no_grad():
                if packed is not None:
                    ref_logp = packed.unpack(packed_logprobs(ref, packed, temperature)[0], mb.response_mask)
                else:
                    ref_logp = core.token_logprobs(sequence_logits(ref, tok, shared), tok.targets, temperature)
            kl = core.kl_penalty(logp, ref_logp, loss_cfg.kl_kind)
            loss_tok = loss_tok + loss_cfg.kl_coef * kl
            metrics["kl"] = core.masked_mean(kl.detach(), tok.response_mask)
        if loss_cfg.nll_coef > 0 and loss_cfg.nll_norm == "tokens":
            loss_tok = loss_tok + loss_cfg.nll_coef * core.nll_on_positive(logp, tok.advantages, tok.response_mask)
        total = logp.new_zeros(())
        # L = L_episode + w * L_step, each normalised over its own tokens (THOR: w = 1)
        weights = {"episode": 1.0, "step": self.method_cfg.step_level.weight}
        for level in ("episode", "step"):
            rows = torch.tensor([lv == level for lv in tok.level], device=tok.response_mask.device)
            if not rows.any():
                continue
            n_tok, n_seq = counts[level]
            total = total + weights[level] * core.aggregate(
                loss_tok[rows], tok.response_mask[rows], loss_cfg.agg, num_tokens=n_tok, num_seqs=n_seq,
                norm_len=loss_cfg.norm_len or self.rollout_cfg.max_total_tokens)
        if loss_cfg.nll_coef > 0 and loss_cfg.nll_norm == "positive":   # THOR's normaliser, both levels
            total = total + loss_cfg.nll_coef * core.nll_positive_mean(logp, tok.advantages, tok.response_mask,
                                                                       counts["positive"][0])
        return total, metrics

    def _all_reduce(self, value: float, op: str = "sum") -> float:
        return collectives.all_reduce_scalar(value, op, self.device)

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each rank saw its own share of the prompts: average every metric over ranks so ``train/*`` describes
        the whole batch (``tirl.modules.collectives.mean_over_ranks``)."""
        return collectives.mean_over_ranks(metrics, self.device)

    # ------------------------------------------------------------------ Lightning hooks
    def make_experience(self, records: list[dict]) -> tuple[list[Trajectory], list[float], list[float], list[Sample], dict]:
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
        with self.sampling_weights():   # FSDP: ranks generate different amounts, so no collective inside
            trajs, rewards, correct, samples, stats = self.make_experience(list(batch))
        metrics = self.rollout_metrics(trajs, rewards, correct)
        metrics.update(stats)
        tb = None
        if self._all_reduce(len(samples)) > 0:   # decided on the global count so every rank agrees
            tb = collate_samples(samples, self.tokenizer.pad_token_id) if samples else self.empty_batch()
            metrics.update(self.behaviour_log_probs(tb))       # recompute before shaping reads the entropy
            if m.shaping.kind != "none":
                tb.advantages, shaped = shape_advantages(tb.advantages, tb.entropy, tb.response_mask, m.shaping)
                metrics["shaping/shaped_token_frac"] = shaped
            metrics.update(self.correct_rollout_mismatch(tb))  # after shaping, on the final advantages
        # With every advantage exactly 0 and no KL term the gradient is exactly 0, but an Adam step would still move
        # the weights along its momentum; such a step is counted without touching the optimizer.
        if tb is not None and (m.loss.kl_coef > 0 or self._all_reduce(float(tb.advantages.abs().sum() > 0)) > 0):
            metrics.update(self.update(tb, [(s.level, s.group) for s in samples]))   # none: the empty batch joins
            metrics["skipped_update"] = 0.0
        else:   # nothing to learn from: keep step/schedule counters moving so runs stay comparable
            metrics["skipped_update"] = 1.0
            self.skip_round()
        metrics = self.mean_over_ranks(metrics)
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, prog_bar=False, on_step=True,
                      batch_size=len(batch))
        self.log("train/reward", metrics["reward_mean"], prog_bar=True, batch_size=len(batch))
        return {"rollouts": (trajs, rewards, correct)}     # for the samples table (tirl.callbacks.SamplesTable)

    def refill_prompts(self, n: int) -> list[dict]:
        dm = getattr(self.trainer, "datamodule", None)
        return dm.refill_prompts(n) if dm is not None and hasattr(dm, "refill_prompts") else []

    def rollout_metrics(self, trajs: list[Trajectory], rewards: list[float], correct: list[float]) -> dict:
        return rollout_metrics(trajs, rewards, correct, self.rollout_cfg, self.response_text)

    def validation_step(self, batch: list[dict], batch_idx: int):
        trajs, rewards, correct = self.heldout_rollouts(batch)
        # each outcome's record position on this rank, to drop the repeats a distributed sampler pads with
        self._val_outputs += [{**o, "position": self._val_seen + o["record"]}
                              for o in heldout_outcomes(batch, trajs, rewards, correct)]
        self._val_seen += len(batch)
        return {"rollouts": (trajs, rewards, correct)}     # for the samples table (tirl.callbacks.SamplesTable)

    def test_step(self, batch: list[dict], batch_idx: int):
        return self.validation_step(batch, batch_idx)

    def heldout_rollouts(self, records: list[dict], temperature: float | None = None,
                         samples: int | None = None) -> tuple[list[Trajectory], list[float], list[float]]:
        """Tool-integrated rollouts of held-out prompts (greedy, or ``samples`` at ``temperature`` = Avg@k),
        scored by the reward and by the accuracy reward (exact answer / exact calls)."""
        m = self.method_cfg
        temperature = m.val_temperature if temperature is None else temperature
        samples = (m.val_samples if samples is None else samples) if temperature > 0 else 1
        cfg = RolloutConfig(**{**self.rollout_cfg.__dict__, "temperature": temperature})
        loop = ToolLoop(make_backend(cfg, self.policy, self.tokenizer), self.sandbox, self.tokenizer, cfg)
        with self.sampling_weights():
            trajs = self.rollout_groups(records, samples, loop)
        rewards, correct = self.score(trajs, records)
        return trajs, rewards, correct

    def validate_records(self, records: list[dict], temperature: float | None = None,
                         samples: int | None = None) -> list[dict]:
        """Per-sample outcomes (correct, reward, length, kind) of ``heldout_rollouts``."""
        return heldout_outcomes(records, *self.heldout_rollouts(records, temperature, samples))

    def _epoch_end(self, prefix: str) -> None:
        outs, self._val_outputs, self._val_seen = self._val_outputs, [], 0
        loaders = getattr(self.trainer, f"{prefix}_dataloaders", None) if self._trainer is not None else None
        sampler = getattr(loaders, "sampler", None)
        # a distributed sampler gives every rank as many records by repeating a few: counted once, not twice
        outs = [o for o in outs if not is_padding(o["position"], sampler)]
        if collectives.all_reduce_scalar(float(len(outs)), "sum", self.device) == 0:
            return
        means = heldout_means(outs, self.sum_over_ranks)
        # the same value on every rank: sync_dist's mean keeps it (and Lightning asks for it in distributed runs)
        self.log(f"{prefix}/acc", means["acc"], prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/reward", means["reward"], sync_dist=True)
        self.log(f"{prefix}/response_len", means["response_len"], sync_dist=True)
        for kind, acc in self.accuracy_by_kind(outs).items():
            self.log(f"{prefix}/acc/{kind}", acc, sync_dist=True)

    def sum_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        world = self.trainer.world_size if self._trainer is not None else 1
        return {k: v * world for k, v in self.mean_over_ranks(metrics).items()}

    def accuracy_by_kind(self, outs: list[dict]) -> dict[str, float]:
        return accuracy_by_kind(outs, self.mean_over_ranks)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_callbacks(self):
        """The samples table, once: Lightning calls this at every fit/validate/test, and a second copy would make it
        log an 'override' notice each time."""
        k = self.method_cfg.log_samples
        trainer = getattr(self, "_trainer", None)
        if not k or (trainer is not None and any(isinstance(c, SamplesTable) for c in trainer.callbacks)):
            return []
        return [SamplesTable(k)]
