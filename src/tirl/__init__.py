"""tirl: tool-integrated reasoning by reinforcement learning (D-CORE and THOR on one core)."""

__version__ = "0.1.0"
