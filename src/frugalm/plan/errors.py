"""The one error type of the planner.

It subclasses `ConfigError` so `frugalm` prints it as a one-line message (exit 2) instead of a traceback:
an unknown chip, a layout that cannot exist, or a model that does not fit are user input problems.
"""

from __future__ import annotations

from frugalm.config import ConfigError


class PlanError(ConfigError):
    """A plan that cannot be made from the given inputs; the message says which input and why."""
