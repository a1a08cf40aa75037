"""AdaLoRA's rank schedule and orthogonality regulariser, and the training hooks that run them.

The schedule (:class:`RankSchedule`), once per optimiser step ``t`` (counted from 1, after
``optimizer.step()`` and before ``zero_grad()``):

- while ``t < T - tfinal``, each entry's importance ``I = |θ·∂L/∂θ|`` updates its smoothed
  value ``Ī ← β₁Ī + (1-β₁)I`` and uncertainty ``Ū ← β₂Ū + (1-β₂)|I - Ī|``;
- the budget is every triplet while ``t ≤ tinit``, then
  ``b(t) = ⌊(b₀ - b_T)·(1 - (t - tinit)/(T - tfinal - tinit))³ + b_T⌋``, and ``b_T`` at the end;
- every ``deltaT`` steps (and at ``t = T - tfinal``, when the budget is reached) the
  triplets scored lowest, ``s = Ī·Ū`` of λ plus the mean of Q's row and of P's column, get
  ``λ = 0``, leaving the budget; after ``T - tfinal`` the final choice is applied each step.

At the end (:meth:`RankSchedule.finalize`) the unchosen triplets are cut out and the config's
``rank_pattern`` records the choice, so the file holds what Hugging Face PEFT writes.

The regulariser adds ``w·mean_M ‖MᵀM - I‖_F`` (``M`` = each P, and each Qᵀ) to the loss through
gradient hooks on P and Q, once per optimiser step, so it works in any loop that calls the
hooks, without changing how the loss is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import adapter_layers
from peftkit.core.training import TrainingContext, TrainingHooks
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import AdaLoraLayer

__all__ = ["AdaLoraHooks", "AdaLoraOptions", "OrthogonalRegulariser", "RankSchedule", "adalora_training"]


def _layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraLayer]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n: layer for n, layer in adapter_layers(inner) if isinstance(layer, AdaLoraLayer) and adapter_name in layer.lora_E}


class RankSchedule:
    """Moves an AdaLoRA adapter's triplets to where they matter (see the module docstring).

    Args:
        model: a ``PeftModel`` (or a model with AdaLoRA layers) holding the adapter.
        config: the adapter's config; ``total_step`` must be set.
        adapter_name: the adapter to allocate.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default") -> None:
        if config.total_step is None:
            raise ValueError("AdaLoraConfig.total_step is None: set it to the number of optimiser steps")
        self.config, self.name = config, adapter_name
        self.layers = _layers(model, adapter_name)
        if not self.layers:
            raise ValueError(f"the model has no AdaLoRA adapter {adapter_name!r}")
        self.initial_budget = sum(layer.lora_E[adapter_name].shape[0] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.mean: dict[str, dict[str, torch.Tensor]] = {}
        self.uncertainty: dict[str, dict[str, torch.Tensor]] = {}
        self.masks: dict[str, torch.Tensor] | None = None  # the final choice, once made

    def budget(self, step: int) -> tuple[int, bool]:
        """``(triplets allowed after step, whether to prune at it)``."""
        c = self.config
        total = c.total_step or 0
        if step <= c.tinit:
            return self.initial_budget, False
        if step > total - c.tfinal:
            return self.target_budget, True
        progress = (step - c.tinit) / (total - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * (1 - progress) ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def _parameters(self, layer: AdaLoraLayer) -> dict[str, nn.Parameter]:
        return {"A": layer.lora_A[self.name], "E": layer.lora_E[self.name], "B": layer.lora_B[self.name]}

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for n, layer in self.layers.items():
            mean, unc = self.mean.setdefault(n, {}), self.uncertainty.setdefault(n, {})
            for key, p in self._parameters(layer).items():
                if p.grad is None:
                    continue
                importance = (p * p.grad).abs()
                mean[key] = b1 * mean.get(key, torch.zeros_like(p)) + (1 - b1) * importance
                unc[key] = b2 * unc.get(key, torch.zeros_like(p)) + (1 - b2) * (importance - mean[key]).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """Each module's triplet scores: λ's, plus the means of Q's row and P's column."""
        out = {}
        for n, layer in self.layers.items():
            r = layer.lora_E[self.name].shape[0]
            if "E" not in self.mean.get(n, {}):
                out[n] = torch.zeros(r, device=layer.lora_E[self.name].device)
                continue
            s = {k: self.mean[n][k] * self.uncertainty[n][k] for k in ("A", "E", "B")}
            out[n] = s["E"].reshape(-1) + s["A"].mean(dim=1) + s["B"].mean(dim=0)
        return out

    @torch.no_grad()
    def _mask_to(self, budget: int) -> dict[str, torch.Tensor]:
        scores = self.scores()
        cut = self.initial_budget - budget
        if cut <= 0:
            masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        else:
            everything = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
            threshold = torch.kthvalue(everything, cut).values.item()
            masks = {n: s > threshold for n, s in scores.items()}
        self._apply(masks)
        return masks

    @torch.no_grad()
    def _apply(self, masks: dict[str, torch.Tensor]) -> None:
        for n, layer in self.layers.items():
            e = layer.lora_E[self.name]
            e.masked_fill_(~masks[n].to(e.device).view(-1, 1), 0.0)

    def step(self, step: int) -> None:
        """Runs the schedule for optimiser step ``step`` (counted from 1)."""
        end = (self.config.total_step or 0) - self.config.tfinal
        if step < end:
            self._update_importance()
            budget, prune = self.budget(step)
            if prune:
                self._mask_to(budget)
        elif step == end or self.masks is None:
            self.masks = self._mask_to(self.target_budget)
            self.mean, self.uncertainty = {}, {}
        else:
            self._apply(self.masks)

    @torch.no_grad()
    def finalize(self) -> dict[str, int]:
        """Cuts out the triplets left out of the budget and writes ``rank_pattern``. Returns the
        ranks per module."""
        if self.masks is None:
            self.masks = self._mask_to(self.target_budget)
        pattern = {}
        for n, layer in self.layers.items():
            keep = self.masks[n].cpu()
            if len(keep) != self.config.init_r:
                raise RuntimeError(f"{n} holds {len(keep)} triplets, not init_r={self.config.init_r}: it was cut already")
            layer.keep_triplets(self.name, keep)
            pattern[f"{n}.lora_E"] = [bool(k) for k in keep]
        self.config.rank_pattern = pattern
        return {n: int(m.sum()) for n, m in self.masks.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "uncertainty": self.uncertainty, "masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.uncertainty, self.masks = state["mean"], state["uncertainty"], state["masks"]


class OrthogonalRegulariser:
    """Adds the gradient of ``w·mean_M ‖MᵀM - I‖_F`` (over every P and Qᵀ of the adapter) to
    P's and Q's gradients, through hooks that run when a gradient is accumulated. It is added
    once per optimiser step (on the first backward after :meth:`next_step`), as if the term
    were part of the step's loss."""

    def __init__(self, layers: dict[str, AdaLoraLayer], adapter_name: str, weight: float) -> None:
        self.weight = weight
        self.params = [p for layer in layers.values() for p in (layer.lora_A[adapter_name], layer.lora_B[adapter_name])]
        self.done: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        self.rows = {id(layer.lora_A[adapter_name]) for layer in layers.values()}

    def term(self, p: torch.Tensor, is_q: bool) -> torch.Tensor:
        """``‖MᵀM - I‖_F`` of one matrix (``M = Qᵀ`` for Q, so ``QQᵀ``)."""
        cov = p @ p.T if is_q else p.T @ p
        return torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype))

    def _hook(self, p: torch.Tensor) -> None:
        if id(p) in self.done or p.grad is None or p.numel() == 0:
            return
        self.done.add(id(p))
        with torch.enable_grad():
            leaf = p.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.term(leaf, id(p) in self.rows), leaf)
        p.grad.add_(grad, alpha=self.weight / len(self.params))

    def next_step(self) -> None:
        self.done.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# -- as training hooks of the method ----------------------------------------------------------
@dataclass
class AdaLoraOptions:
    """Run-config options of AdaLoRA besides its config fields (none yet: the schedule is the
    config's ``init_r``, ``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``orth_reg_weight``)."""


class AdaLoraHooks(TrainingHooks):
    """Runs the rank schedule and the regulariser through a training loop, and cuts the adapter
    to its budget at the end (the run's result is the final, cut adapter)."""

    def __init__(self, config: AdaLoraConfig) -> None:
        self.config = config
        self.schedule: RankSchedule | None = None
        self.regulariser: OrthogonalRegulariser | None = None
        self._restored: dict[str, Any] | None = None

    def before_training(self, ctx: TrainingContext) -> None:
        model = ctx.model
        name = getattr(model, "active_adapter", "default")
        config = model.peft_config[name] if hasattr(model, "peft_config") else self.config
        if config.total_step is None:
            config.total_step = ctx.total_steps
            AdaLoraConfig.__post_init__(config)  # the schedule must fit in the run
        elif config.total_step != ctx.total_steps:
            ctx.log(f"AdaLoRA: total_step={config.total_step} but the run takes {ctx.total_steps} steps")
        self.schedule = RankSchedule(model, config, name)
        if self._restored:
            self.schedule.load_state_dict(self._restored)
        if config.orth_reg_weight > 0:
            self.regulariser = OrthogonalRegulariser(self.schedule.layers, name, config.orth_reg_weight)

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        assert self.schedule is not None
        self.schedule.step(ctx.step)
        if self.regulariser is not None:
            self.regulariser.next_step()

    def after_training(self, ctx: TrainingContext) -> bool:
        assert self.schedule is not None
        if self.regulariser is not None:
            self.regulariser.remove()
        ranks = self.schedule.finalize()
        ctx.log(f"AdaLoRA: {sum(ranks.values())} triplets kept over {len(ranks)} modules")
        return True

    def state_dict(self) -> dict[str, Any]:
        return {} if self.schedule is None else self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state or None


def adalora_training(config: AdaLoraConfig, options: AdaLoraOptions | None) -> AdaLoraHooks:
    """AdaLoRA's training hooks: the schedule always runs (it is the method)."""
    return AdaLoraHooks(config)
