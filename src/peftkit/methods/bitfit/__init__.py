"""BitFit: trains the bias terms only (each adapter a copy of the selected biases)."""

from __future__ import annotations

from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import Method, register_method
from peftkit.core.targeting import TargetError
from peftkit.methods.bitfit.config import BitFitConfig
from peftkit.methods.bitfit.layer import SUPPORTED, BitFitLayer, create_bitfit_layer, has_bias

__all__ = ["BitFitConfig", "BitFitLayer", "biased_modules"]


def biased_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that own a bias (adapter layers count by their base).

    Raises:
        TargetError: when there is none (Llama-style models have no biases).
    """
    names = [n for n, m in model.named_modules() if n and (has_bias(m) or isinstance(m, BitFitLayer))]
    inside = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    names = [n for n in names if not any(n.startswith(i + ".") for i in inside)]
    if not names:
        raise TargetError(
            f"{type(model).__name__} has no bias parameters, so BitFit has nothing to train. "
            "Try LayerNorm tuning (LNTuningConfig) or (IA)³ (IA3Config) instead."
        )
    return names


METHOD = register_method(
    Method(
        peft_type="BITFIT",
        config_cls=BitFitConfig,
        description="BitFit: trains only the bias terms (all, or of chosen modules; ~0.1%), mergeable",
        supported=SUPPORTED,
        is_supported=has_bias,
        create_layer=create_bitfit_layer,
        default_targets=biased_modules,
        presets={"bitfit": {"method": {"name": "bitfit"}, "train": {"lr": 1e-2}}},
    )
)
