"""What a training extension is: a plug-in of the ``peftkit train`` loop configured by a
section ``train.<key>`` of the run config (e.g. ``train.self_training``).

An extension is the loop's own hooks (:class:`~peftkit.core.training.TrainingHooks`: before
training, after each optimiser step, after training, state through checkpoints) plus one
that only a data-aware loop has: :meth:`TrainExtension.next_round`, which may hand the loop
more records to train another round on. Built-ins live in ``peftkit.train.extensions``;
others register in the entry-point group ``peftkit.train_extensions``, or a ``train:`` key
that is a spec (``my_extensions.py:Curriculum``) loads one from a file or module.
"""

from __future__ import annotations

from typing import Any, ClassVar

from peftkit.core.training import TrainingContext, TrainingHooks

__all__ = ["TrainExtension"]


class TrainExtension(TrainingHooks):
    """A plug-in of the training loop.

    Class attributes:
        name: the key of its section under ``train:`` in a run config.
        options_cls: the dataclass that section is validated into.
    """

    name = ""
    options_cls: ClassVar[type | None] = None
    options: Any = None

    def setup(self, options: Any) -> TrainExtension:
        """A fresh instance for one run with its validated ``options``."""
        clone = type(self)()
        clone.options = options
        return clone

    def check(self, options: Any, cfg: Any, task: Any) -> None:
        """Raises ``ConfigError`` when the run cannot use this extension (called while the
        config is validated, before anything loads)."""

    def next_round(self, ctx: TrainingContext) -> list[dict[str, Any]] | None:
        """Called when a round of training ends: records (raw, as read from a data file) to
        add to the labelled training records for another round, or None to finish."""
        return None

    def round_epochs(self) -> float | None:
        """Epochs of the rounds this extension starts (None: ``train.epochs``)."""
        return None
