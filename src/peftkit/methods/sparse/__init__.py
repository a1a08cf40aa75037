"""Sparse fine-tuning: train a chosen subset of individual weights (a sparse delta).

The file holds, per adapted module, the flat indices (int64) and the trained values, so its
size is about count × 12 bytes (float32 values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import adapter_layers
from peftkit.core.registry import Method, register_method
from peftkit.core.targeting import find_targets
from peftkit.core.training import TrainingContext, TrainingHooks
from peftkit.integrations.transformers import is_linear_like
from peftkit.methods.sparse.config import SparseConfig
from peftkit.methods.sparse.layer import SUPPORTED, SparseLayer, create_sparse_layer

__all__ = ["SparseConfig", "SparseLayer", "calibrate"]


def _supported(module: nn.Module) -> bool:
    return is_linear_like(module) or isinstance(module, SparseLayer)


def _prepare_config(model: nn.Module, config: SparseConfig) -> None:
    """Defaults to every linear layer but the head; splits a ``count`` between the modules in
    proportion to their sizes (largest remainders), so the total is exact."""
    if config.target_modules is None:
        config.target_modules = "all-linear"
    if config.count is None:
        return
    names = find_targets(model, config.target_modules, is_supported=_supported, supported=SUPPORTED,
                         exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                         layers_pattern=config.layers_pattern)
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    total = sum(sizes.values())
    if config.count > total:
        raise ValueError(f"count={config.count} exceeds the {total} weights of the adapted modules")
    exact = {n: config.count * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    for n in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[: config.count - sum(counts.values())]:
        counts[n] += 1
    config._counts = counts  # type: ignore[attr-defined]


@torch.no_grad()
def _assign(layers: dict[str, SparseLayer], adapter_name: str, scores: dict[str, torch.Tensor]) -> None:
    budget = sum(len(layer.sparse_indices[adapter_name]) for layer in layers.values())
    flat = torch.cat([scores[n].flatten() for n in layers])
    threshold_idx = torch.topk(flat, budget).indices
    owner = torch.repeat_interleave(torch.arange(len(layers)), torch.tensor([scores[n].numel() for n in layers]))
    offsets = torch.cumsum(torch.tensor([0] + [scores[n].numel() for n in layers]), 0)
    for i, (name, layer) in enumerate(layers.items()):
        chosen = threshold_idx[owner[threshold_idx] == i] - offsets[i]
        if len(chosen) == 0:  # every module keeps at least one entry
            chosen = torch.topk(scores[name].flatten(), 1).indices
        layer.set_indices(adapter_name, chosen.sort().values.to(layer.base_layer.weight.device))


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> None:
    """Re-selects the trained entries by accumulated squared gradients (empirical Fisher)
    over ``batches``, globally across the adapted modules, keeping the total budget. The
    deltas restart at zero; call it before training."""
    name = adapter_name or getattr(model, "active_adapter", None) or "default"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = {n: layer for n, layer in adapter_layers(inner) if isinstance(layer, SparseLayer) and name in layer.sparse_values}
    if not layers:
        raise ValueError(f"no sparse adapter {name!r} in the model")
    weights = {n: layer.base_layer.weight for n, layer in layers.items()}
    flags = {n: w.requires_grad for n, w in weights.items()}
    scores = {n: torch.zeros(w.numel(), dtype=torch.float64) for n, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        seen = 0
        for batch in batches:
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (n, _), g in zip(weights.items(), grads, strict=True):
                if g is not None:
                    scores[n] += g.detach().double().pow(2).flatten().cpu()
            seen += 1
        if seen == 0:
            raise ValueError("calibrate needs at least one batch")
    finally:
        for n, w in weights.items():
            w.requires_grad_(flags[n])
    _assign(layers, name, scores)
    for layer in layers.values():
        layer.sparse_values[name].requires_grad_(not model.peft_config[name].inference_mode if hasattr(model, "peft_config") else True)


@dataclass
class CalibrationOptions:
    """Run-config options of sparse fine-tuning.

    Args:
        calibration_batches: training batches whose squared gradients choose the trained
            entries when ``selection`` is ``"fisher"``.
    """

    calibration_batches: int = 8

    def __post_init__(self) -> None:
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {self.calibration_batches}")


class FisherCalibration(TrainingHooks):
    """Chooses the trained entries by Fisher information before the first step. The pass runs
    with dropout off, so the choice is the same on every run (and on resume) for one seed."""

    def __init__(self, options: CalibrationOptions) -> None:
        self.options = options

    def before_training(self, ctx: TrainingContext) -> None:
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            calibrate(ctx.model, ctx.batches(self.options.calibration_batches), loss_fn=ctx.loss)
        finally:
            ctx.model.train(was_training)
        ctx.log(f"sparse: entries chosen by Fisher information over {self.options.calibration_batches} batches")


def _training_hooks(config: SparseConfig, options: CalibrationOptions) -> FisherCalibration | None:
    return FisherCalibration(options) if config.selection == "fisher" else None


METHOD = register_method(
    Method(
        peft_type="SPARSE",
        config_cls=SparseConfig,
        description="Sparse fine-tuning: trains chosen individual weights (by Fisher, magnitude or at random) as a sparse delta",
        supported=SUPPORTED,
        is_supported=_supported,
        create_layer=create_sparse_layer,
        prepare_config=_prepare_config,
        training_hooks=_training_hooks,
        training_options=CalibrationOptions,
        presets={"sparse": {"method": {"name": "sparse", "density": 0.01}, "train": {"lr": 1e-3}}},
    )
)
