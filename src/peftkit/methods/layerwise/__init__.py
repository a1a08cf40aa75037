"""Layer-wise (partial) fine-tuning: the top blocks (and chosen modules) trained in place;
with layer-wise learning rates and gradual unfreezing for any loop."""

from __future__ import annotations

from torch import nn

from peftkit.core.inplace import parameters_under
from peftkit.core.registry import Method, register_method
from peftkit.core.targeting import TargetError
from peftkit.methods.layerwise.blocks import BlockList, find_blocks, select_blocks
from peftkit.methods.layerwise.config import LayerwiseConfig
from peftkit.methods.layerwise.schedule import GradualUnfreezer, layerwise_param_groups

__all__ = [
    "BlockList",
    "GradualUnfreezer",
    "LayerwiseConfig",
    "find_blocks",
    "layerwise_param_groups",
    "select_blocks",
]

EVERYTHING = ".*"


def chosen_blocks(model: nn.Module, config: LayerwiseConfig) -> list[str]:
    """The names of the blocks the config trains (none when it names no blocks)."""
    if not config.uses_blocks:
        return []
    return select_blocks(find_blocks(model, config.layers_pattern), config.top_layers, config.layers)


def _check(model: nn.Module, config: LayerwiseConfig) -> None:
    # Resolve the blocks before anything changes, so that a bad config leaves the model as it was.
    chosen_blocks(model, config)


def _trained_parameters(model: nn.Module, config: LayerwiseConfig, targets: list[str]) -> list[str]:
    """Parameters inside the chosen blocks and the ``target_modules``, outside
    ``exclude_modules``."""
    extras = targets if config.target_modules is not None else []
    names = parameters_under(model, [*chosen_blocks(model, config), *extras], exclude=config.exclude_modules)
    if not names:
        raise TargetError("the chosen blocks and target_modules hold no parameter outside exclude_modules")
    return names


METHOD = register_method(
    Method(
        peft_type="LAYERWISE",
        config_cls=LayerwiseConfig,
        description="Layer-wise fine-tuning: trains the top-k blocks (or named modules) in place; LR decay, unfreezing",
        supported="any module",
        is_supported=lambda module: True,
        create_layer=None,
        trainable_base_parameters=_trained_parameters,
        # With only blocks asked for, every module is a candidate; the blocks are chosen above.
        default_targets=lambda model: EVERYTHING,
        prepare_config=_check,
        presets={f"top{k}": {"method": {"name": "layerwise", "top_layers": k}, "train": {"lr": 1e-4}} for k in (1, 2, 3, 4)},
    )
)
