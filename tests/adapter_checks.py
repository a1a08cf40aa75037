"""Helpers shared by the adapter test tables: perturbing adapters, snapshots, a short
training loop. They look at parameter names (a test may; the library may not)."""

from __future__ import annotations

import torch
from torch import nn

from models import output_of

__all__ = [
    "BASE_PREFIX",
    "base_name",
    "frozen_snapshot",
    "loss_of",
    "perturb",
    "train_steps",
    "weights_snapshot",
]

BASE_PREFIX = "base_model.model."


def base_name(wrapped_name: str) -> str:
    """The name a parameter of a wrapped model had in the plain model
    (``base_model.model.lin0.base_layer.weight`` -> ``lin0.weight``)."""
    name = wrapped_name.removeprefix(BASE_PREFIX)
    return ".".join(part for part in name.split(".") if part != "base_layer")


def is_base_parameter(model: nn.Module, wrapped_name: str, plain_names: set[str]) -> bool:
    return base_name(wrapped_name) in plain_names and ".modules_to_save." not in wrapped_name


@torch.no_grad()
def perturb(model: nn.Module, plain_names: set[str] | None = None, seed: int = 1, scale: float = 0.1) -> None:
    """Adds noise to every trainable parameter so that the adapter changes the output.
    With ``plain_names`` (the parameter names of the unwrapped model) only the parameters
    the adapter itself owns are changed, never trained base parameters (biases)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if plain_names is not None and is_base_parameter(model, name, plain_names):
            continue
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def weights_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, keyed by their plain-model name."""
    return {base_name(k): v.detach().clone() for k, v in model.state_dict().items()}


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}


def loss_of(model: nn.Module, inputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    out = model(**inputs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return torch.nn.functional.mse_loss(logits, target)


def train_steps(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 5, lr: float = 1e-2) -> list[float]:
    """Runs ``steps`` Adam steps towards a fixed random target; returns the losses."""
    g = torch.Generator().manual_seed(7)
    target = torch.randn(output_of(model, inputs).shape, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps + 1):
        loss = loss_of(model, inputs, target)
        losses.append(loss.item())
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses
