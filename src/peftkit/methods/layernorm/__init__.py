"""LayerNorm tuning: trains only the normalisation layers' scales and shifts."""

from __future__ import annotations

from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import Method, register_method
from peftkit.core.targeting import TargetError, name_matches
from peftkit.methods.layernorm.config import LNTuningConfig
from peftkit.methods.layernorm.layer import SUPPORTED, LNTuningLayer, create_ln_tuning_layer, is_norm

__all__ = ["LNTuningConfig", "LNTuningLayer", "is_norm", "norm_modules"]


def norm_modules(model: nn.Module) -> list[str]:
    """Names of the normalisation layers of ``model`` (already wrapped ones included)."""
    inside = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    return [
        n
        for n, m in model.named_modules()
        if n and (is_norm(m) or isinstance(m, LNTuningLayer)) and not any(n.startswith(i + ".") for i in inside)
    ]


def _compact(names: list[str], all_names: list[str]) -> list[str]:
    """The shortest name suffixes (last component, e.g. ``"LayerNorm"``, ``"ln_f"``) that
    select exactly ``names``; the full names where a suffix would select more."""
    wanted = set(names)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if all(n in wanted for n in all_names if any(name_matches(n, leaf) for leaf in leaves)):
        return leaves
    return list(names)


def prepare_ln_tuning_config(model: nn.Module, config: LNTuningConfig) -> None:
    """Fills ``target_modules`` left None with the model's norms (by their short names).

    Raises:
        TargetError: when the model has no normalisation layer with parameters.
    """
    if config.target_modules is not None:
        return
    names = norm_modules(model)
    if not names:
        raise TargetError(
            f"{type(model).__name__} has no normalisation layer with a trainable scale; name the modules to tune "
            "in target_modules, or pick another method"
        )
    config.target_modules = _compact(names, [n for n, _ in model.named_modules()])


METHOD = register_method(
    Method(
        peft_type="LN_TUNING",
        config_cls=LNTuningConfig,
        description="LayerNorm tuning: trains only the norms' scales and shifts (LayerNorm, RMSNorm; ~0.01-0.05%)",
        supported=SUPPORTED,
        is_supported=is_norm,
        create_layer=create_ln_tuning_layer,
        prepare_config=prepare_ln_tuning_config,  # every norm, written into the saved config
        presets={"layernorm": {"method": {"name": "ln_tuning"}, "train": {"lr": 5e-3}}},
    )
)
