"""From trajectories to padded tensors: one training sequence per sample, loss only where the model wrote."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One sequence to train on: ``context`` gets no loss; ``response`` tokens get loss where ``loss_mask`` is 1."""

    context: list[int]
    response: list[int]
    loss_mask: list[int]
    old_logprobs: list[float]
    entropies: list[float]
    advantage: float
    level: str = "episode"        # episode | step (THOR)


@dataclass
class TensorBatch:
    input_ids: torch.Tensor       # [N, L] right-padded context+response
    attention_mask: torch.Tensor  # [N, L]
    targets: torch.Tensor         # [N, L-1] next tokens (input_ids shifted left)
    mask: torch.Tensor            # [N, L-1] 1 where the target is a model-written response token
    old_logp: torch.Tensor        # [N, L-1]
    entropy: torch.Tensor         # [N, L-1]
    advantages: torch.Tensor      # [N, L-1] per token (after any shaping)
    level: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: list[int]) -> TensorBatch:
        """Rows ``idx``, trimmed to their own longest sequence (micro-batches pad only to themselves)."""
        ix = torch.tensor(idx, dtype=torch.long)
        width = int(self.attention_mask[ix].sum(-1).max())
        return TensorBatch(
            self.input_ids[ix, :width], self.attention_mask[ix, :width], self.targets[ix, : width - 1],
            self.mask[ix, : width - 1], self.old_logp[ix, : width - 1], self.entropy[ix, : width - 1],
            self.advantages[ix, : width - 1], [self.level[i] for i in idx],
        )

    def response_window(self) -> TensorBatch:
        """The same rows with the per-token tensors cut to start at the first column any row has a loss token in.

        ``input_ids`` keep their full width (the model must read the prompt); callers ask the model for the last
        ``mask.shape[1] + 1`` positions' logits only (``logits_to_keep``), which line up with the cut tensors.
        """
        cols = self.mask.sum(0).nonzero()
        start = int(cols[0]) if len(cols) else self.mask.shape[1] - 1
        if start == 0:
            return self
        return TensorBatch(self.input_ids, self.attention_mask, self.targets[:, start:], self.mask[:, start:],
                           self.old_logp[:, start:], self.entropy[:, start:], self.advantages[:, start:], self.level)

    def to(self, device) -> TensorBatch:
        return TensorBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.targets, self.mask,
                                                   self.old_logp, self.entropy, self.advantages)), self.level)


def collate_samples(samples: list[Sample], pad_id: int) -> TensorBatch:
    n = len(samples)
    width = max(len(s.context) + len(s.response) for s in samples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width - 1))
    old = torch.zeros((n, width - 1))
    ent = torch.zeros((n, width - 1))
    adv = torch.zeros((n, width - 1))
    for i, s in enumerate(samples):
        c, r = len(s.context), len(s.response)
        ids[i, : c + r] = torch.tensor(s.context + s.response)
        attn[i, : c + r] = 1
        # the target at position j is token j+1, so response token k sits at position c-1+k
        sl = slice(c - 1, c - 1 + r)
        mask[i, sl] = torch.tensor(s.loss_mask, dtype=torch.float)
        old[i, sl] = torch.tensor(s.old_logprobs)
        ent[i, sl] = torch.tensor(s.entropies)
        adv[i, sl] = s.advantage
    return TensorBatch(ids, attn, ids[:, 1:].clone(), mask, old, ent, adv * mask, [s.level for s in samples])
