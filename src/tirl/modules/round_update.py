"""The optimizer steps of one rollout round (DESIGN.md "Update schedule"; verl's actor update), as a mixin of the RL
module: the round's samples are planned into mini-batches of whole groups (``tirl.rl.schedule``), each one optimizer
step made of micro-batches whose token-mean is normalised by the mini-batch's global counts (all micro-batches, all
ranks); ``ppo_epochs`` repeats the pass. Before the first step the trainer can recompute the behaviour log-probs
(``method.old_log_probs=recompute``, verl's ``compute_log_prob``) and correct the rollout/trainer mismatch with
truncated importance sampling (``method.rollout_correction``). The math is in ``tirl.rl.core``.

The host module provides ``method_cfg``, ``rollout_cfg``, ``policy``, ``tokenizer``, ``micro_batch_loss``,
``global_counts``, ``micro_batch_reading``, ``_all_reduce`` and Lightning's ``optimizers``/``manual_backward``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tirl.models.forward import packed_logprobs, sequence_logits
from tirl.rl import core
from tirl.rl.batch import Sample, TensorBatch, collate_samples, window_to_targets
from tirl.rl.schedule import mini_batches_per_round, plan_round, steps_per_round, token_micro_batches


class RoundUpdate:
    def steps_per_round(self) -> int:
        """Optimizer steps of one rollout round (one ``training_step``): mini-batches x ppo_epochs."""
        m = self.method_cfg
        return steps_per_round(m.rollout_batch_size, m.mini_batch_size, m.ppo_epochs)

    def global_positive_tokens(self, batch: TensorBatch) -> float:
        """Positive-advantage loss tokens of ``batch`` over all ranks (the ``positive`` NLL normaliser)."""
        return self._all_reduce(float(core.positive_token_count(batch.advantages, batch.response_mask)))

    def update(self, batch: TensorBatch, groups: list | None = None) -> dict:
        """The round's optimizer steps (``tirl.rl.schedule.plan_round``): per epoch, the groups shuffled into the
        fixed number of mini-batches, each one step. ``groups``: a key per row (rows sharing a key stay in one
        mini-batch); None = every row its own group. Per-step metrics land in ``self.last_step_metrics``; the
        round's (their mean) are returned."""
        m = self.method_cfg
        opt = self.optimizers()
        keys = groups if groups is not None else list(range(len(batch)))
        plan = plan_round(keys, mini_batches_per_round(m.rollout_batch_size, m.mini_batch_size), m.ppo_epochs,
                          m.shuffle_seed, self.global_step // self.steps_per_round(), self.global_rank)
        self.last_step_metrics = [self.mini_batch_step(batch, rows, opt) for rows in plan]
        out: dict[str, float] = {}
        for key in {key for step in self.last_step_metrics for key in step}:
            out[key] = sum(step.get(key, 0.0) for step in self.last_step_metrics) / len(plan)
        return out

    def mini_batch_step(self, batch: TensorBatch, rows: list[int], opt) -> dict[str, float]:
        """One optimizer step on rows ``rows`` of the round: micro-batches normalised by this mini-batch's global
        counts (all its micro-batches, all ranks), gradient clip, step, schedule. An empty share (this rank got no
        group for this mini-batch) still joins every gradient sync with zero-weighted passes."""
        m = self.method_cfg
        mini = batch.select(rows) if rows else self.empty_batch()
        counts = {lv: self.global_counts(mini, lv) for lv in ("episode", "step")}
        if m.loss.nll_coef > 0 and m.loss.nll_norm == "positive":
            counts["positive"] = (self.global_positive_tokens(mini), 0.0)
        logs: dict[str, list[float]] = defaultdict(list)
        chunks = self.micro_batches(mini) if rows else []
        # every rank must run as many backward passes as the busiest one (DDP syncs gradients in each), so
        # ranks with fewer samples add zero-weighted passes
        n_passes = int(self._all_reduce(len(chunks), "max"))
        opt.zero_grad(set_to_none=True)
        for k in range(n_passes):
            idx, weight = (chunks[k], 1.0) if k < len(chunks) else ((chunks or [[0]])[0], 0.0)
            mb = mini.select(idx).to(self.device)
            loss, metrics = self.micro_batch_loss(mb, counts)
            # each rank's loss is already divided by the token count of ALL ranks; DDP/FSDP then average
            # gradients over ranks, so scale back up to make the result the global token-mean's gradient
            self.manual_backward(loss * (weight * self.trainer.world_size))
            if weight:
                logs["loss"].append(loss.item())
                w = mb.response_mask.sum().item()
                for key, v in metrics.items():
                    logs[key].append(float(v) * w)
                logs["_w"].append(w)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), m.max_grad_norm)
        self.optimizer_step_and_schedule(opt)
        wsum = max(sum(logs.pop("_w", [])), 1.0)
        out = {"loss": sum(logs.pop("loss", [])), "grad_norm": float(grad_norm)}
        out.update({key: sum(v) / wsum for key, v in logs.items()})
        return out

    def micro_batches(self, batch: TensorBatch) -> list[list[int]]:
        """Row indices of ``batch``'s micro-batches: ``method.micro_batch_tokens`` set → balanced by tokens
        (``tirl.rl.schedule.token_micro_batches``, real tokens per row: what a packed pass reads; a padded pass
        pads each to its longest row); else ``micro_batch_size`` rows each, in order. Under DDP/FSDP each rank
        balances its own share (its prompts' groups); ranks then run as many passes as the busiest one."""
        m = self.method_cfg
        if m.micro_batch_tokens is not None:
            return token_micro_batches(batch.attention_mask.sum(-1).tolist(), m.micro_batch_tokens)
        order = list(range(len(batch)))
        return [order[s:s + m.micro_batch_size] for s in range(0, len(order), m.micro_batch_size)]

    def optimizer_step_and_schedule(self, opt) -> None:
        """One optimizer step and one schedule step. Lightning's ``global_step`` (hence ``trainer.max_steps`` and the
        schedule's length) counts optimizer steps, so a round of k mini-batch steps is k of them, skipped or not."""
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def skip_round(self) -> None:
        """Nothing to learn from this round: count its k steps (the schedule moves) without touching the weights."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        for _ in range(self.steps_per_round()):
            self.optimizer_step_and_schedule(opt)

    def empty_batch(self) -> TensorBatch:
        """One all-padding sequence with no loss tokens: lets a rank with nothing to learn join the collectives."""
        pad = self.tokenizer.pad_token_id
        return collate_samples([Sample([pad, pad], [pad], [0], [0.0], [0.0], 0.0)], pad)

    # ------------------------------------------------------------------ behaviour log-probs, rollout mismatch
    @torch.no_grad()
    def recompute_old_log_probs(self, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainer's own log-probs and full-vocabulary entropies [N, L-1] of every loss token of the round,
        before any update (verl's ``compute_log_prob``), read the way the update reads them (packed rows; or
        shared contexts, response windows) so the first step's ratio is 1 to float precision. Other positions keep
        their values."""
        temperature = self.rollout_cfg.temperature or 1.0
        logp_all, ent_all = batch.old_log_probs.clone(), batch.entropy.clone()
        chunks = self.micro_batches(batch)
        n_passes = int(self._all_reduce(len(chunks), "max"))   # FSDP: every rank joins every forward
        for k in range(n_passes):
            idx = chunks[min(k, len(chunks) - 1)]
            mb = batch.select(idx).to(self.device)
            packed, shared = self.micro_batch_reading(mb)
            if packed is not None:
                logp, ent = packed_logprobs(self.policy, packed, temperature, with_entropy=True)
                if k < len(chunks):
                    rows = torch.tensor(idx)[packed.rows.cpu()]
                    cols = packed.cols.cpu()
                    logp_all[rows, cols] = logp.cpu().to(logp_all.dtype)
                    ent_all[rows, cols] = ent.cpu().to(ent_all.dtype)
                continue
            tok = shared.tokens if shared is not None else mb.response_window()
            logits = sequence_logits(self.policy, tok, shared)
            if k >= len(chunks):
                continue
            logp = window_to_targets(core.token_logprobs(logits, tok.targets, temperature), mb, shared).cpu()
            ent = window_to_targets(core.token_entropy(logits, temperature), mb, shared).cpu()
            ix, width, keep = torch.tensor(idx), mb.response_mask.shape[1], mb.response_mask.bool().cpu()
            logp_all[ix, :width] = torch.where(keep, logp.to(logp_all.dtype), logp_all[ix, :width])
            ent_all[ix, :width] = torch.where(keep, ent.to(ent_all.dtype), ent_all[ix, :width])
        return logp_all, ent_all

    def behaviour_log_probs(self, tb: TensorBatch) -> dict[str, float]:
        """With ``method.old_log_probs=recompute``: replace the sampler's log-probs and entropies in ``tb`` by the
        trainer's (DA-GRPO then shapes with these entropies) and report the mismatch; else nothing."""
        if self.method_cfg.old_log_probs != "recompute":
            return {}
        rollout_logp = tb.old_log_probs
        tb.old_log_probs, tb.entropy = self.recompute_old_log_probs(tb)
        self._rollout_logp = rollout_logp
        diff = (tb.old_log_probs - rollout_logp).abs() * tb.response_mask
        return {"rollout_mismatch/kl_k3": core.mismatch_kl_k3(tb.old_log_probs, rollout_logp, tb.response_mask).item(),
                "rollout_mismatch/max_abs_logp_diff": diff.max().item() if diff.numel() else 0.0}

    def correct_rollout_mismatch(self, tb: TensorBatch) -> dict[str, float]:
        """``method.rollout_correction.kind=tis``: scale each token's advantage by min(π_old/π_rollout, C). The
        clipped (and dual-clipped) PPO loss is positively homogeneous in A, so this is the policy loss times the
        weight, as verl and TRL apply it; signs (clip metrics, positive-NLL tokens) are unchanged."""
        c = self.method_cfg.rollout_correction
        rollout_logp = getattr(self, "_rollout_logp", None)
        self._rollout_logp = None
        if c.kind != "tis" or rollout_logp is None:
            return {}
        w = core.truncated_is_weights(tb.old_log_probs, rollout_logp, tb.response_mask, c.cap)
        tb.advantages = tb.advantages * w
        keep = tb.response_mask.bool()
        return {"rollout_correction/weight_mean": core.masked_mean(w, keep).item(),
                "rollout_correction/weight_max": w[keep].max().item() if keep.any() else 0.0}
