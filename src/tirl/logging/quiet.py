"""A quiet first run: library notices a tirl user cannot act on are silenced here, each deliberately and narrowly.

Only exact messages are filtered, never a whole category or library, so a new warning still shows. What tirl itself
caused is fixed where it is caused instead (the KV-cache keyword in ``tirl.rollout.backend``, the policy's train
mode in ``tirl.modules.policy``, W&B's ``anonymous`` setting in ``tirl.logging.wandb``).
"""

from __future__ import annotations

import logging
import warnings

# Lightning advertises its cloud products (LitLogger, litmodels) at INFO level on every fit.
_ADVERTISEMENTS = ("💡 Tip: For seamless cloud",)


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTISEMENTS)


def quiet_library_notices() -> None:
    """Install the filters (idempotent; call once a run, before the Trainer is built)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisements) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertisements())
    # Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) still builds torch's deprecated
    # LeafSpec on every training step's output; nothing in tirl touches it, and a Lightning upgrade removes it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
