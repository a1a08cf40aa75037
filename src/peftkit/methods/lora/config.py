"""LoRA configuration."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from peftkit.core.config import TargetedConfig, check_unimplemented_fields
from peftkit.core.targeting import matches_key

__all__ = ["LoraConfig"]


@dataclass
class LoraConfig(TargetedConfig):
    """LoRA: ``h = W₀x + (α/r)·B·A·x`` with A (r × in) and B (out × r) trained.

    Args:
        r: rank of the update.
        lora_alpha: α; the update is scaled by α/r (α/√r with ``use_rslora``).
        lora_dropout: dropout on the input of the LoRA branch.
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2 ``Conv1D``; set automatically).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of adapted layers).
        use_rslora: scale by α/√r (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA: a trained magnitude per output times the direction
            of ``W₀ + ΔW``.
        init_lora_weights: ``True`` (B = 0, A Kaiming-uniform), ``"gaussian"`` (A ~ N(0, 1/r)),
            ``"pissa"`` (principal singular vectors; the residual stays in the base weight;
            PEFT's ``"pissa_niter_<n>"`` is read as ``"pissa"``), or ``False`` (both random:
            the output changes at once; for tests). PEFT's ``"olora"``, ``"orthogonal"``,
            ``"loftq"``, ``"eva"`` and ``"corda"`` raise NotImplementedError.
        rank_pattern: per-module rank, ``{name or regex: r}``.
        alpha_pattern: per-module α, ``{name or regex: alpha}``.
        target_parameters: parameters to adapt directly, ``["experts.gate_up_proj"]``
            (``<module path or suffix>.<parameter>``): 2-D weights or 3-D stacks of expert
            weights no linear layer holds. With these alone, leave ``target_modules`` None (or ``[]``).

    PEFT's other fields (``lora_bias``, ``layer_replication``, ``trainable_token_indices``,
    ``ensure_weight_tying``, ``use_qalora``, ``loftq_config``,
    ``eva_config``, ``corda_config``, ...) are accepted so that its configs and files load;
    peftkit does not implement those features, so each raises NotImplementedError naming
    the field when set to anything but its default.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: Union[list[str], None] = None
    # PEFT's fields for features peftkit lacks: accepted at their defaults (_PEFT_ONLY_FIELDS).
    lora_bias: bool = False
    layer_replication: Union[list[tuple[int, int]], None] = None
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None
    ensure_weight_tying: bool = False
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

    # field -> (default, what it is in PEFT): set to anything else, NotImplementedError.
    _PEFT_ONLY_FIELDS: ClassVar[dict[str, tuple[Any, str]]] = {
        "lora_bias": (False, "a trained bias on lora_B"),
        "layer_replication": (None, "layer replication (duplicated blocks sharing weights)"),
        "trainable_token_indices": (None, "training selected token embeddings"),
        "ensure_weight_tying": (False, "keeping tied embeddings tied in modules_to_save"),
        "use_qalora": (False, "QALoRA"),
        "qalora_group_size": (16, "QALoRA"),
        "megatron_config": (None, "Megatron parallel layers"),
        "loftq_config": ({}, "LoftQ initialisation"),
        "eva_config": (None, "EVA initialisation"),
        "corda_config": (None, "CorDA initialisation"),
        "alora_invocation_tokens": (None, "activated LoRA"),
        "arrow_config": (None, "Arrow routing"),
        "kasa_config": (None, "KaSA"),
        "lora_ga_config": (None, "LoRA-GA initialisation"),
        "monteclora_config": (None, "MonteCLoRA"),
        "velora_config": (None, "VeLoRA"),
        "use_bdlora": (None, "block-diagonal LoRA"),
    }

    # What PEFT accepts for init_lora_weights and peftkit does not implement (yet).
    _PEFT_ONLY_INITS: ClassVar[tuple[str, ...]] = ("olora", "orthogonal", "loftq", "eva", "corda")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        _check_alpha("lora_alpha", self.lora_alpha)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self._check_init()
        check_unimplemented_fields(self, self._PEFT_ONLY_FIELDS)
        self.rank_pattern = _mapping("rank_pattern", self.rank_pattern, "rank")
        self.alpha_pattern = _mapping("alpha_pattern", self.alpha_pattern, "alpha")
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {value!r}")
        for name, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{name!r}]", value)
        self._check_target_parameters()

    def _check_target_parameters(self) -> None:
        value = self.target_parameters
        if value is None:
            return
        if isinstance(value, str) or not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"target_parameters must be a list of parameter names, e.g. ['experts.gate_up_proj']; got {value!r}")
        self.target_parameters = sorted(value) if isinstance(value, set) else list(value)

    def _check_init(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, bool) or init in ("gaussian", "pissa"):
            return
        # PEFT's "pissa_niter_<n>" asks for a faster, approximate SVD; peftkit computes the
        # exact one, which that approximates.
        if isinstance(init, str) and re.fullmatch(r"pissa_niter_[0-9]+", init):
            return
        if init in self._PEFT_ONLY_INITS:
            raise NotImplementedError(
                f"init_lora_weights={init!r} is a PEFT initialisation that peftkit does not implement; "
                "use True (the default), 'gaussian' or 'pissa'"
            )
        raise ValueError(
            "init_lora_weights must be one of True, False, 'gaussian', 'pissa' or 'pissa_niter_<n>'; "
            f"got {init!r}"
        )

    def rank_for(self, module_name: str) -> int:
        for key, value in self.rank_pattern.items():
            if matches_key(module_name, key):
                return value
        return self.r

    def alpha_for(self, module_name: str) -> float:
        for key, value in self.alpha_pattern.items():
            if matches_key(module_name, key):
                return value
        return self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _check_alpha(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _mapping(name: str, value: object, what: str) -> dict:
    """``value`` as a dict, or a TypeError saying what the field holds."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a mapping {{module name or regex: {what}}}, e.g. {{'q_proj': 16}}; "
            f"got {type(value).__name__} {value!r}"
        )
    return dict(value)
