"""LoKr configuration (field names and defaults as Hugging Face PEFT's ``LoKrConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Union

from peftkit.core.config import TargetedConfig
from peftkit.methods.loha.config import check_patterns, pattern_value

__all__ = ["LoKrConfig"]


@dataclass
class LoKrConfig(TargetedConfig):
    """LoKr: ``ΔW = (α/r)·W1 ⊗ W2``, a Kronecker product of a small matrix and a (low-rank)
    one. ``out = a·b`` and ``in = c·d`` are split into factors near their square roots
    (or near ``decompose_factor``); ``W1`` is (a × c), ``W2`` is (b × d). ``W2`` is stored as a
    rank-r product ``W2a·W2b`` unless r ≥ max(b, d)/2; ``W1`` is only factored with
    ``decompose_both``. On a convolution ``W2`` carries the kernel.

    Args:
        r: rank of the factored Kronecker factors.
        alpha: the update is scaled by alpha/r.
        rank_dropout: during training, drops rows (outputs) of ``ΔW`` with this probability.
        rank_dropout_scale: rescale the kept rows by the kept fraction.
        module_dropout: during training, skips the adapter for a step with this probability.
        use_effective_conv2d: Tucker-factored kernels for ``W2`` on convolutions above 1×1.
        decompose_both: also factor ``W1`` as ``W1a·W1b`` when r is below max(a, c)/2.
        decompose_factor: split dimensions near this factor (-1: near the square root).
        init_weights: True: ``W1 = 0`` (output unchanged at first); ``"lycoris"``: ``W2`` (or
            ``W2b``) zero instead, as LyCORIS does; False: every factor random (for tests).
        rank_pattern: per-module r; alpha_pattern: per-module alpha.
    """

    peft_type: ClassVar[str] = "LOKR"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_patterns(self)
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or (
                self.decompose_factor < 1 and self.decompose_factor != -1):
            raise ValueError(f"decompose_factor must be a positive integer or -1 (near the square root), got {self.decompose_factor!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: name the block indices to adapt")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)
