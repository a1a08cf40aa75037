"""Full fine-tuning: every parameter trained in place; the baseline of every comparison."""

from __future__ import annotations

from torch import nn

from peftkit.core.inplace import parameters_under
from peftkit.core.registry import Method, register_method
from peftkit.methods.full.config import FullFineTuningConfig

__all__ = ["FullFineTuningConfig"]

EVERYTHING = ".*"


def _trained_parameters(model: nn.Module, config: FullFineTuningConfig, targets: list[str]) -> list[str]:
    """Parameters inside the targets (the whole model when ``target_modules`` is None),
    outside ``exclude_modules`` and outside ``modules_to_save`` (trained as copies)."""
    return parameters_under(model, targets, exclude=config.exclude_modules, include_root=config.target_modules is None)


METHOD = register_method(
    Method(
        peft_type="FULL",
        config_cls=FullFineTuningConfig,
        description="Full fine-tuning: trains every parameter in place (100%); the baseline to compare against",
        supported="any module",
        is_supported=lambda module: True,
        create_layer=None,
        trainable_base_parameters=_trained_parameters,
        default_targets=lambda model: EVERYTHING,
        presets={"full": {"method": {"name": "full"}, "train": {"lr": 5e-5}}},
    )
)
