"""The checkpoints a job lists: a training extension that saves the adapter every ``every``
optimiser steps (per epoch, by default) to ``<folder>/step-<N>``, a folder PEFT and peftkit
load like the final adapter. ``peftkit train``'s own checkpoint (one, overwritten, for
resuming) is a different thing; these stay.

A job's config names it by spec: ``train: {"peftkit.jobs.checkpoints:JobCheckpoints":
{every: 4, folder: ...}}``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from peftkit.train.extension import TrainExtension
from peftkit.train.schema import ConfigError

__all__ = ["SPEC", "JobCheckpoints", "JobCheckpointsOptions"]

SPEC = "peftkit.jobs.checkpoints:JobCheckpoints"


@dataclass
class JobCheckpointsOptions:
    every: int = 1
    folder: str = ""

    def __post_init__(self) -> None:
        if self.every < 1 or not self.folder:
            raise ConfigError(f"{SPEC}: every must be at least 1 and folder set, got {self.every}, {self.folder!r}")


class JobCheckpoints(TrainExtension):
    """Saves the adapter every ``every`` steps (the main process only; a step saved before,
    as when a resumed run replays steps, is kept as it was)."""

    options_cls = JobCheckpointsOptions

    def after_optimizer_step(self, ctx: Any) -> None:
        step = ctx.step
        if step % self.options.every or not getattr(ctx, "main", True):
            return
        target = os.path.join(self.options.folder, f"step-{step}")
        if os.path.isdir(target):
            return
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ctx.model.save_pretrained(tmp)
        os.replace(tmp, target)
