"""Lightning's W&B logger, minus one argument W&B now warns about."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` that does not pass ``anonymous=None`` to ``wandb.init``.

    Lightning always passes it; wandb (0.31 here) then warns "The anonymous setting has no effect and will be removed"
    on every run. The setting is left out unless a config asks for it (``anonymous: true``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]
