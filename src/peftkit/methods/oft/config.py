"""OFT configuration (field names and defaults as Hugging Face PEFT's ``OFTConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from peftkit.core.config import TargetedConfig

__all__ = ["OFTConfig"]


@dataclass
class OFTConfig(TargetedConfig):
    """OFT: ``h = W₀·(Rᵀx)``, the layer's input rotated by a block-diagonal matrix ``R`` whose
    blocks are Cayley transforms of trained skew-symmetric matrices, so the angles between
    the neurons of ``W₀`` are kept (orthogonal fine-tuning).

    Each block of size b is parametrised by its b(b-1)/2 upper-triangular entries ``q``;
    ``Q = q - qᵀ`` and ``R = (I - Q)(I + Q)⁻¹``, or, with ``use_cayley_neumann`` (the
    default), the truncated series ``I + 2Q + 2Q² + … + Q^{n-1}`` of ``num_cayley_neumann_terms``
    terms (no matrix inverse; orthogonal up to the truncation). Give either ``r`` (the number
    of blocks) or ``oft_block_size``, not both; a size that does not divide the input is moved
    to the nearest one that does, with a warning.

    Args:
        r: number of blocks (0: derived from ``oft_block_size``).
        oft_block_size: size of each block (0: derived from ``r``).
        module_dropout: during training, replaces this share of the blocks by the identity.
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: the series instead of the exact Cayley transform.
        num_cayley_neumann_terms: terms of the series.
        init_weights: True: ``q = 0`` (``R = I``, output unchanged); False: ``q ~ N(0, 0.1²)``.
        coft, eps: constrained OFT; not supported (``coft=True`` is refused).
        bias: ``"none"`` only.
        fan_in_fan_out: kept for file compatibility.
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"give either r (the number of blocks) or oft_block_size, not both and not neither "
                f"(r={self.r}, oft_block_size={self.oft_block_size}): r × oft_block_size is the layer's input size"
            )
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 1:
            raise ValueError("num_cayley_neumann_terms must be at least 1")
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout!r}")
        if self.coft:
            raise NotImplementedError("OFTConfig(coft=True) (constrained OFT) is not supported; use coft=False")
        if self.bias != "none":
            raise NotImplementedError(f"OFTConfig(bias={self.bias!r}) is not supported; use bias='none'")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: name the block indices to adapt")
