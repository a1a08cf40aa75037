"""Which way a validation metric points. Each task evaluates itself (``Task.evaluate``)."""

from __future__ import annotations

__all__ = ["metric_direction"]

_LOWER_IS_BETTER = ("eval_loss", "perplexity")


def metric_direction(name: str) -> bool:
    """True when a higher value is better."""
    return name not in _LOWER_IS_BETTER
