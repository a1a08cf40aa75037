"""Validation metrics. Each task evaluates itself (``Task.evaluate``): accuracy and
macro-F1 for classification, loss and perplexity for language modelling, and so on."""

from __future__ import annotations

from peftkit.train.tasks.base import classification_metrics

__all__ = ["classification_metrics", "metric_direction"]

_LOWER_IS_BETTER = ("eval_loss", "perplexity")


def metric_direction(name: str) -> bool:
    """True when a higher value is better."""
    return name not in _LOWER_IS_BETTER
