"""Experiment-tracking helpers beyond Lightning's loggers (the W&B workspace layout)."""
