"""Adaptive LoRA: spend a rank budget unevenly, by relevance, during training.

Every adapted module starts with ``init_r`` rank components (``B[:, i]·A[i, :]``). After a
warm-up, the total number of components left falls on a cubic schedule to
``target_r × modules``; every ``interval`` steps the least important components across all
modules are switched off. Importance follows AdaLoRA's smoothed sensitivity: for a
component, ``I = Σ |θ·∂L/∂θ|`` over its entries of A and B, ``Ī ← β₁Ī + (1-β₁)I``,
``Ū ← β₂Ū + (1-β₂)|I-Ī|``, score ``Ī·Ū``. At the end :meth:`RankAllocator.finalize` cuts
the switched-off components out, so the adapter is a plain LoRA adapter with a per-module
``rank_pattern`` (files load in any LoRA reader) and ``ΔW`` is unchanged by the cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import adapter_layers
from peftkit.core.training import TrainingContext, TrainingHooks
from peftkit.methods.lora.layer import LoraLayer

__all__ = ["AdaptiveOptions", "AdaptiveRankHooks", "RankAllocator", "adaptive_training"]


class RankAllocator:
    """Moves LoRA rank from weak to strong modules during training.

    Call :meth:`step` once per optimiser step, after ``optimizer.step()`` and before
    ``zero_grad()``; call :meth:`finalize` after training.

    Args:
        model: a :class:`~peftkit.PeftModel` with a LoRA adapter.
        target_r: the average rank per module at the end (the budget).
        total_steps: the number of optimiser steps of the run.
        warmup_steps: steps before any pruning (importance is still measured).
        final_steps: steps at the end with the budget reached and no more pruning.
        interval: prune every this many steps.
        beta1, beta2: smoothing of the sensitivity and of its uncertainty.
        adapter_name: the adapter (default: the active one).
    """

    def __init__(
        self,
        model: nn.Module,
        target_r: int,
        total_steps: int,
        warmup_steps: int | None = None,
        final_steps: int | None = None,
        interval: int = 10,
        beta1: float = 0.85,
        beta2: float = 0.85,
        adapter_name: str | None = None,
    ) -> None:
        self.model = model
        self.name = adapter_name or model.active_adapter
        self.layers = {n: layer for n, layer in adapter_layers(model.get_base_model()) if isinstance(layer, LoraLayer) and self.name in layer.lora_A}
        if not self.layers:
            raise ValueError(f"no LoRA adapter {self.name!r} on linear/conv layers to allocate rank in")
        if any(self.name in layer.lora_magnitude_vector for layer in self.layers.values()):
            raise ValueError("adaptive rank allocation works on plain LoRA, not DoRA")
        odd = [n for n, layer in self.layers.items() if not layer.has_one_factor_pair()]
        if odd:
            raise ValueError(f"adaptive rank allocation needs one factor pair B·A per layer; {odd} have another form "
                             "(nn.MultiheadAttention, grouped convolutions, target_parameters)")
        self.initial_total = sum(layer.r[self.name] for layer in self.layers.values())
        self.target_total = target_r * len(self.layers)
        if not 0 < self.target_total <= self.initial_total:
            raise ValueError(f"target_r={target_r} must be positive and at most the initial rank per module")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps if warmup_steps is not None else total_steps // 10
        self.final_steps = final_steps if final_steps is not None else total_steps // 5
        if self.warmup_steps + self.final_steps >= total_steps:
            raise ValueError("warmup_steps + final_steps must leave steps for pruning")
        self.interval, self.beta1, self.beta2 = interval, beta1, beta2
        self.masks = {n: torch.ones(layer.r[self.name], dtype=torch.bool) for n, layer in self.layers.items()}
        self.mean = {n: torch.zeros(layer.r[self.name]) for n, layer in self.layers.items()}
        self.uncertainty = {n: torch.zeros(layer.r[self.name]) for n, layer in self.layers.items()}

    def budget(self, step: int) -> int:
        """Rank components allowed after ``step`` (cubic decay between warm-up and the end)."""
        if step < self.warmup_steps:
            return self.initial_total
        span = self.total_steps - self.warmup_steps - self.final_steps
        progress = min(1.0, (step - self.warmup_steps) / span)
        left = (self.initial_total - self.target_total) * (1 - progress) ** 3
        return self.target_total + math.ceil(left)

    def _sensitivity(self, layer: LoraLayer) -> torch.Tensor | None:
        a, b = layer.factors(self.name)
        if a.grad is None or b.grad is None:
            return None
        r = a.shape[0]
        s_a = (a.detach() * a.grad).abs().reshape(r, -1).sum(1)
        s_b = (b.detach() * b.grad).abs().reshape(b.shape[0], r, -1).sum((0, 2))
        return (s_a + s_b).float().cpu()

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Updates importance from the current gradients and prunes when due."""
        for n, layer in self.layers.items():
            sens = self._sensitivity(layer)
            if sens is None:
                continue
            self.mean[n] = self.beta1 * self.mean[n] + (1 - self.beta1) * sens
            self.uncertainty[n] = self.beta2 * self.uncertainty[n] + (1 - self.beta2) * (sens - self.mean[n]).abs()
        if step >= self.warmup_steps and step % self.interval == 0:
            self._prune_to(self.budget(step))
        self._apply_masks()

    def _prune_to(self, budget: int) -> None:
        alive = sum(int(m.sum()) for m in self.masks.values())
        excess = alive - budget
        if excess <= 0:
            return
        candidates = []
        for n, mask in self.masks.items():
            score = self.mean[n] * self.uncertainty[n]
            keep_one = int(torch.argmax(torch.where(mask, score, torch.full_like(score, -1.0))))
            candidates += [(float(score[i]), n, i) for i in range(len(mask)) if mask[i] and i != keep_one]
        for _, n, i in sorted(candidates)[:excess]:
            self.masks[n][i] = False

    def _apply_masks(self) -> None:
        for n, layer in self.layers.items():
            mask = self.masks[n]
            if bool(mask.all()):
                continue
            a, b = layer.factors(self.name)
            off = (~mask).nonzero().flatten().to(a.device)
            a.index_fill_(0, off, 0.0)
            b.index_fill_(1, off, 0.0)

    def ranks(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self.masks.items()}

    @torch.no_grad()
    def finalize(self) -> dict[str, int]:
        """Cuts switched-off components out of every layer and records the ranks in the
        adapter's config (``rank_pattern`` / ``alpha_pattern``). Returns the ranks."""
        self._prune_to(self.target_total)
        config = self.model.peft_config[self.name]
        ranks = self.ranks()
        for n, layer in self.layers.items():
            keep = self.masks[n].nonzero().flatten()
            a, b = layer.factors(self.name)
            layer.lora_A[self.name].weight = nn.Parameter(a.detach()[keep.to(a.device)].clone(), requires_grad=a.requires_grad)
            layer.lora_B[self.name].weight = nn.Parameter(b.detach()[:, keep.to(b.device)].clone(), requires_grad=b.requires_grad)
            for attr, value in (("out_features", len(keep)), ("in_features", len(keep)), ("out_channels", len(keep)), ("in_channels", len(keep))):
                target = layer.lora_A[self.name] if attr.startswith("out") else layer.lora_B[self.name]
                if hasattr(target, attr):
                    setattr(target, attr, value)
            layer.r[self.name] = len(keep)
            self.masks[n] = torch.ones(len(keep), dtype=torch.bool)
        scaling = {n: layer.scaling[self.name] for n, layer in self.layers.items()}
        config.rank_pattern = {n: r for n, r in ranks.items()}
        # keep each module's scaling: α_m = s·r_m (α_m = s·√r_m with rsLoRA)
        config.alpha_pattern = {
            n: scaling[n] * (math.sqrt(r) if config.use_rslora else r) for n, r in ranks.items()
        }
        config.r = max(ranks.values())
        return ranks


# -- as training hooks of the LoRA method (``method: {name: lora, adaptive_target_r: 4}``) --
@dataclass
class AdaptiveOptions:
    """Run-config options of adaptive LoRA.

    Args:
        adaptive_target_r: the mean rank per module at the end of the run; None: off.
        adaptive_interval: prune every this many optimiser steps.
    """

    adaptive_target_r: int | None = None
    adaptive_interval: int = 10

    def __post_init__(self) -> None:
        if self.adaptive_target_r is not None and self.adaptive_target_r < 1:
            raise ValueError(f"adaptive_target_r must be at least 1, got {self.adaptive_target_r}")
        if self.adaptive_interval < 1:
            raise ValueError(f"adaptive_interval must be at least 1, got {self.adaptive_interval}")


class AdaptiveRankHooks(TrainingHooks):
    """Runs a :class:`RankAllocator` through a training loop and cuts the adapter to its
    budget at the end (the run's result is then the final, pruned adapter)."""

    def __init__(self, options: AdaptiveOptions) -> None:
        self.options = options
        self.allocator: RankAllocator | None = None
        self._restored: dict[str, Any] | None = None

    def before_training(self, ctx: TrainingContext) -> None:
        self.allocator = RankAllocator(ctx.model, self.options.adaptive_target_r or 0, ctx.total_steps,
                                       interval=self.options.adaptive_interval)
        if self._restored:
            for key in ("masks", "mean", "uncertainty"):
                getattr(self.allocator, key).update(self._restored[key])

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        assert self.allocator is not None
        self.allocator.step(ctx.step - 1)  # the step just taken, counted from 0

    def after_training(self, ctx: TrainingContext) -> bool:
        assert self.allocator is not None
        ranks = self.allocator.finalize()
        ctx.log(f"adaptive LoRA: {sum(ranks.values())} rank components over {len(ranks)} modules")
        return True

    def state_dict(self) -> dict[str, Any]:
        if self.allocator is None:
            return {}
        return {key: dict(getattr(self.allocator, key)) for key in ("masks", "mean", "uncertainty")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state or None


def adaptive_training(config: Any, options: AdaptiveOptions) -> AdaptiveRankHooks | None:
    """LoRA's training hooks: adaptive rank allocation when ``adaptive_target_r`` is set."""
    return AdaptiveRankHooks(options) if options.adaptive_target_r else None
