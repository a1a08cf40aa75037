"""Self-training on unlabelled data (``train.self_training``): weak supervision from the
model's own confident predictions.

The run first trains on the labelled records as usual. Each further round labels the
unlabelled records with the current model, keeps those predicted with probability at least
``threshold`` (at most ``max_per_class`` per class, the most confident first, so that one
class does not swamp the others), and trains another round on the labelled records plus
these pseudo-labelled ones, continuing from the current weights with a fresh optimiser and
schedule. Pseudo-labels are made anew each round. The best checkpoint on the validation
records is the run's result, over all rounds::

    train:
      self_training: {unlabeled: unlabeled.jsonl, rounds: 2, threshold: 0.9, max_per_class: 2000}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from peftkit.train.extension import TrainExtension
from peftkit.train.schema import ConfigError, path_field
from peftkit.train.tasks.base import Task

__all__ = ["SelfTraining", "SelfTrainingOptions"]


@dataclass
class SelfTrainingOptions:
    """Args:
        unlabeled: a data file (any layout the task reads) whose labels, if any, are ignored.
        rounds: pseudo-labelling rounds after the first, labelled-only one.
        threshold: the least probability of the predicted class for a record to be kept.
        max_per_class: at most this many pseudo-labelled records per class (None: no cap).
        max_unlabeled: use the first n unlabelled records only.
        epochs: epochs of each pseudo-labelled round (default ``train.epochs``); the
            pseudo-labelled set is often many times the labelled one.
    """

    unlabeled: str = path_field("")
    rounds: int = 1
    threshold: float = 0.9
    max_per_class: int | None = None
    max_unlabeled: int | None = None
    epochs: float | None = None

    def __post_init__(self) -> None:
        if not self.unlabeled:
            raise ConfigError("train.self_training.unlabeled is required: a data file of unlabelled records")
        if self.rounds < 1:
            raise ConfigError(f"train.self_training.rounds must be at least 1, got {self.rounds}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"train.self_training.threshold must be in (0, 1], got {self.threshold}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.self_training.epochs must be positive, got {self.epochs}")
        for name in ("max_per_class", "max_unlabeled"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.self_training.{name} must be at least 1, got {value}")


class SelfTraining(TrainExtension):
    """Self-training: more rounds on confident pseudo-labels of unlabelled records."""

    name = "self_training"
    options_cls = SelfTrainingOptions

    def check(self, options: SelfTrainingOptions, cfg: Any, task: Task) -> None:
        if not os.path.exists(options.unlabeled):
            raise ConfigError(f"train.self_training.unlabeled: {options.unlabeled!r} does not exist")
        if type(task).class_probabilities is Task.class_probabilities:
            raise ConfigError(f"train.self_training needs a task that predicts classes; {task.name!r} does not")

    def next_round(self, ctx: Any) -> list[dict[str, Any]] | None:
        o: SelfTrainingOptions = self.options
        if ctx.state.round >= o.rounds:
            return None
        records = self._unlabeled(ctx)
        probs = ctx.class_probabilities(records)
        confidence, predicted = probs.max(dim=-1)
        chosen: list[tuple[float, int]] = []
        for c in range(probs.shape[1]):
            rows = [(float(confidence[i]), i) for i in (predicted == c).nonzero().flatten().tolist()
                    if float(confidence[i]) >= o.threshold]
            rows.sort(reverse=True)
            chosen += rows[: o.max_per_class] if o.max_per_class else rows
        if not chosen:
            ctx.log(f"self-training: no unlabelled record reaches probability {o.threshold}; stopping")
            return None
        labels = ctx.labels
        counts = {str(labels[c]): int(sum(1 for _, i in chosen if int(predicted[i]) == c)) for c in range(probs.shape[1])}
        ctx.log(f"self-training: {len(chosen)} of {len(records)} unlabelled records pseudo-labelled at p >= {o.threshold} {counts}")
        task, data = ctx.task, ctx.cfg.data
        return [task.with_label(records[i], labels[int(predicted[i])], data) for _, i in sorted(chosen, key=lambda x: x[1])]

    def round_epochs(self) -> float | None:
        return self.options.epochs

    def _unlabeled(self, ctx: Any) -> list[dict[str, Any]]:
        o: SelfTrainingOptions = self.options
        records = ctx.task.read(o.unlabeled, ctx.cfg.data)
        if o.max_unlabeled:
            records = records[: o.max_unlabeled]
        if not records:
            raise ConfigError(f"train.self_training.unlabeled: {o.unlabeled!r} holds no records")
        column = getattr(ctx.cfg.data, "label_column", None)
        return [{k: v for k, v in r.items() if k != column} for r in records]
