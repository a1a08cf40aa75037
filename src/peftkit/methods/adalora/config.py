"""AdaLoRA configuration (field names and defaults as Hugging Face PEFT's ``AdaLoraConfig``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from peftkit.core.config import TargetedConfig, check_unimplemented_fields
from peftkit.methods.lora.config import LoraConfig

__all__ = ["AdaLoraConfig"]


@dataclass
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA: LoRA in SVD form, ``ΔW = (α/r₀)·P·diag(λ)·Q``, whose rank budget moves during
    training to the modules that need it.

    Every target starts with ``init_r`` triplets (a column of ``P`` = ``lora_B``, a value of
    ``λ`` = ``lora_E``, a row of ``Q`` = ``lora_A``). After ``tinit`` warm-up steps the total
    number of triplets falls on a cubic schedule to ``target_r`` per module, reached at
    ``total_step - tfinal``; every ``deltaT`` steps the triplets of lowest smoothed
    importance (``|θ·∂L/∂θ|``, smoothed by ``beta1`` and weighted by its uncertainty,
    smoothed by ``beta2``) have their value ``λ`` set to zero. ``orth_reg_weight`` adds
    ``Σ‖PᵀP - I‖_F + ‖QQᵀ - I‖_F`` (averaged over the matrices) to the loss, keeping ``P`` and
    ``Q`` near-orthogonal. At the end the pruned triplets are cut out; ``rank_pattern``
    records which ones each module keeps (``{"<module>.lora_E": [True, False, ...]}``) and
    the file holds only those. The scale stays ``α/r₀`` with r₀ = ``init_r``.

    Args:
        init_r: triplets per module at the start.
        target_r: the average triplets per module at the end.
        tinit, tfinal: steps before pruning starts, and at the end with the budget reached.
        deltaT: prune every this many steps.
        beta1, beta2: smoothing of the importance and of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser (0: none).
        total_step: optimiser steps of the run; None: ``peftkit train`` fills in the run's.
        lora_alpha: α (0: α = r₀).
        lora_dropout: dropout on the input of the adapter branch.
        init_lora_weights: True: ``λ = 0``, ``P``, ``Q`` ~ N(0, 0.02²) (output unchanged);
            False: all random (for tests).
        rank_pattern: the kept triplets per module, written at the end of training.
        r: unused (Hugging Face PEFT's LoRA field, kept for file compatibility).
        bias: ``"none"`` only.
        fan_in_fan_out: kept for file compatibility (linear layers store (out, in)).
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # Hugging Face PEFT's spelling
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Union[int, None] = None
    rank_pattern: Union[dict[str, list[bool]], None] = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    init_lora_weights: bool = True
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # PEFT's AdaLoraConfig inherits LoRA's fields; those of features AdaLoRA here lacks are
    # accepted at their defaults (NotImplementedError naming the field when set).
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    layer_replication: Union[list[tuple[int, int]], None] = None
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None
    ensure_weight_tying: bool = False
    target_parameters: Union[list[str], None] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    megatron_config: Union[dict[str, Any], None] = None
    megatron_core: Union[str, None] = "megatron.core"
    loftq_config: Union[dict[str, Any], None] = field(default_factory=dict)
    eva_config: Union[dict[str, Any], None] = None
    corda_config: Union[dict[str, Any], None] = None
    alora_invocation_tokens: Union[list[int], None] = None
    arrow_config: Union[dict[str, Any], None] = None
    kasa_config: Union[dict[str, Any], None] = None
    lora_ga_config: Union[dict[str, Any], None] = None
    monteclora_config: Union[dict[str, Any], None] = None
    velora_config: Union[dict[str, Any], None] = None
    use_bdlora: Union[dict[str, Any], None] = None

    # LoRA's table, and the two features LoRA here has that AdaLoRA lacks.
    _PEFT_ONLY_FIELDS: ClassVar[dict[str, tuple[Any, str]]] = {
        **LoraConfig._PEFT_ONLY_FIELDS,
        "use_rslora": (False, "rank-stabilised scaling of AdaLoRA"),
        "target_parameters": (None, "AdaLoRA on nn.Parameters"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA (use_dora=True); use LoraConfig(use_dora=True)")
        check_unimplemented_fields(self, self._PEFT_ONLY_FIELDS)
        for name in ("target_r", "init_r", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be at most init_r ({self.init_r}): the budget only shrinks")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.total_step is not None:
            if isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step <= 0:
                raise ValueError(f"total_step must be a positive integer (or None: the run's), got {self.total_step!r}")
            if self.tinit >= self.total_step - self.tfinal:
                raise ValueError(
                    f"tinit={self.tinit} and tfinal={self.tfinal} leave no pruning phase in total_step={self.total_step} "
                    "steps; lower tinit or tfinal, or train longer"
                )
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not math.isfinite(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise NotImplementedError(f"AdaLoraConfig(bias={self.bias!r}) is not supported; use bias='none'")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"init_lora_weights must be True or False, got {self.init_lora_weights!r}")
        if self.alpha_pattern:
            raise NotImplementedError("AdaLoRA has one lora_alpha for every module; alpha_pattern is not supported")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, Mapping) or not all(
                    isinstance(v, (list, tuple)) and all(isinstance(b, bool) for b in v) for v in self.rank_pattern.values()):
                raise ValueError("rank_pattern must map '<module>.lora_E' to a list of True/False (the kept triplets), "
                                 f"got {self.rank_pattern!r}")
            self.rank_pattern = {k: list(v) for k, v in self.rank_pattern.items()}

    def kept(self, module_name: str) -> list[bool] | None:
        """The kept triplets of a module (after training), or None (all ``init_r`` of them)."""
        if not self.rank_pattern:
            return None
        return self.rank_pattern.get(f"{module_name}.lora_E")
