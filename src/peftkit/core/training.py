"""What a method may run around a training loop: the hooks a method registers.

A method that needs more than gradient steps (a calibration pass before training, a rank
schedule during it, a final cut after it) returns a :class:`TrainingHooks` object from its
registry entry's ``training_hooks``. Every training loop that honours the registry — the
``peftkit train`` loop, or a user's own — calls them at the same points::

    hooks.before_training(ctx)           # after wrapping, before the first step
    for each optimiser step:
        optimizer.step(); scheduler.step()
        hooks.after_optimizer_step(ctx)  # gradients still present
        optimizer.zero_grad()
    changed = hooks.after_training(ctx)  # True: the final model is the result

``ctx`` is anything with the attributes of :class:`TrainingContext`. Nothing here imports
a training framework; the core stays free of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["TrainingContext", "TrainingHooks"]


class TrainingContext(Protocol):
    """What hooks may read of a run: the model being trained (a ``PeftModel``), where the
    run stands, its loss and a source of training batches."""

    model: nn.Module
    total_steps: int
    step: int

    def batches(self, count: int) -> Iterator[Any]:
        """Up to ``count`` training batches, the same ones each time it is called."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The run's training loss of ``model`` on ``batch``."""
        ...

    def log(self, message: str) -> None: ...


class TrainingHooks:
    """No-op hooks; a method overrides what it needs. ``state_dict`` / ``load_state_dict``
    carry the hooks' own state through a checkpoint so a resumed run continues exactly."""

    def before_training(self, ctx: TrainingContext) -> None:
        """Runs once, after the model is wrapped and before the first optimiser step (also
        on resume, before the checkpoint's weights are loaded)."""

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        """Runs after each optimiser step, before the gradients are cleared."""

    def after_training(self, ctx: TrainingContext) -> bool:
        """Runs once after the last step. Returns True when it changed the model, which then
        is the run's result (evaluated and saved) instead of the best checkpoint."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""


def run_hooks(hooks: Iterable[TrainingHooks], name: str, ctx: TrainingContext) -> list[Any]:
    """Calls hook ``name`` of each of ``hooks`` in order; returns their results."""
    return [getattr(h, name)(ctx) for h in hooks]
