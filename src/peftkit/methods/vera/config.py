"""VeRA configuration (field names and defaults as Hugging Face PEFT's ``VeraConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from peftkit.core.config import TargetedConfig

__all__ = ["VeraConfig"]


@dataclass
class VeraConfig(TargetedConfig):
    """VeRA: ``h = W₀x + λ_b ⊙ (B·(λ_d ⊙ (A·x)))`` with ``A`` (r × in) and ``B`` (out × r) random,
    frozen and shared by every adapted layer, and only the vectors ``λ_d`` (r) and ``λ_b``
    (out) trained per layer.

    ``A`` and ``B`` are drawn once for the largest input and output among the targets (Kaiming
    uniform, from a generator seeded with ``projection_prng_key``); each layer uses their
    leading rows and columns.

    Args:
        r: rank of the shared projections (large: VeRA trains only r + out values per layer).
        projection_prng_key: seed of the projections.
        save_projection: store ``A`` and ``B`` in the file (``base_model.vera_A``/``vera_B``);
            else they are drawn again from the seed when the file is loaded.
        vera_dropout: dropout on the input of the VeRA branch.
        d_initial: the starting value of ``λ_d``; ``λ_b`` starts at zero (output unchanged).
        fan_in_fan_out: kept for file compatibility (linear layers store (out, in)).
        bias: ``"none"`` only (peft's ``"all"``/``"vera_only"`` are refused).
        init_weights: True: ``λ_b = 0``, ``λ_d = d_initial``; False: ``λ_b = 1``, ``λ_d`` random (for tests).
    """

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "vera_only"] = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if not 0.0 <= float(self.vera_dropout) < 1.0:
            raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if self.bias != "none":
            raise NotImplementedError(f"VeraConfig(bias={self.bias!r}) is not supported; use bias='none'")
        for name in ("save_projection", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: name the block indices to adapt")

    def to_dict(self) -> dict[str, Any]:
        """As the base class, without ``exclude_modules`` when unset: PEFT's VeRA config has no
        such field."""
        out = super().to_dict()
        if out.get("exclude_modules") is None:
            out.pop("exclude_modules", None)
        return out
