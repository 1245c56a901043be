"""The kind of exception whose message is meant for the person running tirl, not for a developer.

A ``UserError`` is something the user can fix — a config value, a data line, a path, a missing package or
device — and its message is one sentence saying what is wrong and how to fix it. The entry points print that
sentence and exit with status 2, without a traceback (``HYDRA_FULL_ERROR=1`` shows it). Each module keeps
its own subclass (``ConfigError``, ``DataError``, ...), so callers can still catch the narrow kind.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; ``str(err)`` is one sentence saying what and how."""
