"""LoHa configuration (field names and defaults as Hugging Face PEFT's ``LoHaConfig``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.core.config import TargetedConfig
from peftkit.core.targeting import matches_key

__all__ = ["LoHaConfig", "check_patterns", "pattern_value"]


def pattern_value(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first key of ``pattern`` that matches ``module_name`` (a name suffix
    or a regular expression), else ``default``."""
    for key, value in pattern.items():
        if matches_key(module_name, key):
            return value
    return default


def check_patterns(config: Any, rank_field: str = "r", alpha_field: str = "alpha") -> None:
    """Checks ``r``/``alpha`` and the ``rank_pattern``/``alpha_pattern`` of a config."""
    for name in ("rank_pattern", "alpha_pattern"):
        value = getattr(config, name)
        if value is None:
            setattr(config, name, {})
        elif not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping {{module name or regex: value}}, e.g. {{'q_proj': 4}}; got {value!r}")
        else:
            setattr(config, name, dict(value))
    ranks = {rank_field: getattr(config, rank_field)} | {f"rank_pattern[{k!r}]": v for k, v in config.rank_pattern.items()}
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{name} must be a positive integer, got {r!r}")
    alphas = {alpha_field: getattr(config, alpha_field)} | {f"alpha_pattern[{k!r}]": v for k, v in config.alpha_pattern.items()}
    for name, a in alphas.items():
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"{name} must be a number, got {a!r}")
    for name in ("rank_dropout", "module_dropout"):
        p = getattr(config, name, 0.0)
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p!r}")


@dataclass
class LoHaConfig(TargetedConfig):
    """LoHa: ``ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b)``, the Hadamard product of two rank-r
    products, so that ``ΔW`` can reach rank r² with the parameters of two rank-r LoRAs.

    On a convolution the products are taken over the flattened kernel (``out × in·k·k``);
    with ``use_effective_conv2d`` each factor is a Tucker product with a core ``t`` of
    shape (r, r, k, k) instead.

    Args:
        r: rank of each of the two products.
        alpha: the update is scaled by alpha/r.
        rank_dropout: during training, drops whole rows (outputs) of ``ΔW`` with this
            probability and rescales the rest.
        module_dropout: during training, skips the adapter for a step with this probability.
        use_effective_conv2d: Tucker-factored kernels on convolutions with kernels above 1×1.
        init_weights: True: ``W2b = 0`` (the output is unchanged at first); False: every
            factor random (for tests).
        rank_pattern: per-module r, ``{name or regex: r}``.
        alpha_pattern: per-module alpha.
    """

    peft_type: ClassVar[str] = "LOHA"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_patterns(self)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform: name the block indices to adapt")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)
