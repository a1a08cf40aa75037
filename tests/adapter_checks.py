"""Helpers shared by the adapter test tables: perturbing adapters, snapshots, a short
training loop. They look at parameter names (a test may; the library may not)."""

from __future__ import annotations

import math

import torch
from torch import nn

from models import output_of

__all__ = [
    "BASE_PREFIX",
    "FLOAT32_EPS",
    "INTEROP_REL",
    "MODEL_REL",
    "assert_rounding_close",
    "base_name",
    "frozen_snapshot",
    "is_base_parameter",
    "loss_of",
    "perturb",
    "rounding_tolerance",
    "train_steps",
    "weights_snapshot",
]

BASE_PREFIX = "base_model.model."

# The spacing of float32 numbers just above 1 (2⁻²³ ≈ 1.2e-7): one rounding of a float32
# result errs by at most half of it, relative to the result.
FLOAT32_EPS = torch.finfo(torch.float32).eps


def rounding_tolerance(reduction: int, ulps: float = 4.0) -> float:
    """A relative tolerance for two float32 computations of the same sums that group or
    order the terms differently: a fused and a composed product, two BLAS kernels (whose
    blocking differs from one CPU to another, so equal bits on one machine prove nothing on
    the next), a batch and its rows computed one by one.

    The rounding errors of a sum of ``reduction`` terms behave like a random walk: about
    ``sqrt(reduction)·eps`` relative to the size of the terms (the worst case, ``reduction·eps``,
    needs every error to have the same sign). ``ulps`` is the headroom over that typical size.
    """
    return ulps * FLOAT32_EPS * math.sqrt(reduction)


def assert_rounding_close(got: torch.Tensor, expected: torch.Tensor, rel: float, msg: str | None = None,
                          scale: float | None = None) -> None:
    """``got`` equals ``expected`` within ``rel`` relative to each entry and also within ``rel``
    times ``scale`` (default: the largest entry of ``expected``): an entry that came out
    near zero by cancellation carries the rounding error of the larger terms that cancelled."""
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale, msg=msg)


# Whole tiny models (tests/models.py) chain a dozen products of width ≤ 128 through two
# blocks. Where two computations of one of them round differently (merged against
# unmerged weights, a wrapped layer against the plain one), the outputs differ by a few roundings of those sums, amplified by the layers after them.
# Measured over the invariant table: at most 15 eps of the largest output (rsLoRA merged
# into GPT-2's Conv1D); this allows fifteen times that. Use with `assert_rounding_close`.
MODEL_REL = rounding_tolerance(128, ulps=20)  # ≈ 2.7e-5

# The same adapter file in peftkit and in Hugging Face PEFT: the same weights, but the
# libraries order a layer's sums differently (peftkit's fused LoRA layer accumulates the
# adapter's product into the base output, methods/lora/fused.py; PEFT adds it afterwards),
# and BLAS kernels round those layouts differently from one CPU to another. So the outputs
# agree within a few roundings of a layer's sums (≤ 128 terms), not to the bit. (Measured
# in tests/test_interop_peft.py: at most 2.1 eps of the largest output.)
INTEROP_REL = rounding_tolerance(128)  # ≈ 5e-6


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
