"""Bottleneck adapter configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.core.config import TargetedConfig

__all__ = ["NON_LINEARITIES", "VARIANTS", "BottleneckConfig"]

VARIANTS = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass
class BottleneckConfig(TargetedConfig):
    """Bottleneck adapters: down-projection, non-linearity, up-projection.

    Sequential (``houlsby``, ``pfeiffer``): ``h' = h + U·f(D·h)`` on the output ``h`` of each
    adapted layer. Parallel: ``h' = W x + s·U·f(D·x)``, beside the layer, on its input.
    ``U`` starts at zero, so the model's output is unchanged at first.

    Args:
        variant: ``"houlsby"`` (after the attention output and the feed-forward output),
            ``"pfeiffer"`` (after the feed-forward output only) or ``"parallel"`` (beside the
            same layers as Houlsby). Sets the default targets; ``target_modules`` overrides.
        reduction_factor: bottleneck size m = d // reduction_factor.
        bottleneck_size: m directly (overrides ``reduction_factor``).
        non_linearity: ``relu``, ``gelu``, ``silu`` or ``tanh``.
        scaling: s, the weight of a parallel adapter's output.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    variant: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {NON_LINEARITIES}, got {self.non_linearity!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1):
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")

    def size_for(self, dim: int) -> int:
        return self.bottleneck_size or max(1, dim // self.reduction_factor)
