"""Sparse fine-tuning configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.core.config import TargetedConfig

__all__ = ["SELECTIONS", "SparseConfig"]

SELECTIONS = ("magnitude", "random", "fisher")


@dataclass
class SparseConfig(TargetedConfig):
    """Train a chosen subset of individual weights: ``W' = W + scatter(idx, δ)``.

    Args:
        density: share of each adapted weight matrix that is trained (e.g. 0.01).
        count: total number of trained weights over all adapted modules, split between
            them in proportion to their sizes (instead of ``density``).
        selection: ``"magnitude"`` (largest |W|), ``"random"`` (seeded), or ``"fisher"``
            (largest accumulated squared gradients: call
            :func:`peftkit.methods.sparse.calibrate` with a few batches after wrapping; it
            re-selects globally across modules; until then magnitude is used).
        seed: for ``"random"``.
    """

    peft_type: ClassVar[str] = "SPARSE"

    density: float | None = None
    count: int | None = None
    selection: str = "magnitude"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.density is None) == (self.count is None):
            raise ValueError("give exactly one of density (a share, e.g. 0.01) or count (a number of weights)")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"count must be a positive integer, got {self.count!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
