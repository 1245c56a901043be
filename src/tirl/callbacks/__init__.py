"""Lightning callbacks tirl adds itself: ``ValidateAtEndOfFit`` (every training run) and ``SamplesTable`` (the RL
module's rollout samples, from ``GRPOModule.configure_callbacks``)."""

from tirl.callbacks.samples_table import SamplesTable
from tirl.callbacks.validate_at_end import ValidateAtEndOfFit

__all__ = ["SamplesTable", "ValidateAtEndOfFit"]
