"""VeRA layers around ``nn.Linear``, and the projections they share.

The trained vectors live in ``vera_lambda_b`` (out) and ``vera_lambda_d`` (r), as in Hugging
Face PEFT. The frozen projections live once per model in a :class:`SharedProjections` module
that every VeRA layer holds as a child (one object: moving the model moves them once); they
are not parameters and never train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.delta import DeltaLayer
from peftkit.methods.vera.config import VeraConfig

__all__ = ["SUPPORTED", "SharedProjections", "VeraLayer", "create_vera_layer", "is_vera_supported", "kaiming_uniform"]

SUPPORTED = "nn.Linear"


def is_vera_supported(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with ``b = √(6 / shape[1])`` (Kaiming uniform for a ReLU gain), drawn from ``generator``."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class SharedProjections(nn.Module):
    """The frozen ``A`` (r × in_max) and ``B`` (out_max × r) of each adapter, as non-persistent
    buffers ``A_<adapter>``, ``B_<adapter>``."""

    @staticmethod
    def draw(r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` then ``B`` from one CPU generator seeded with ``seed``."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        a = kaiming_uniform((r, in_max), generator)
        b = kaiming_uniform((out_max, r), generator)
        return a, b

    def __init__(self) -> None:
        super().__init__()
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.register_buffer(f"A_{adapter_name}", a, persistent=False)
        self.register_buffer(f"B_{adapter_name}", b, persistent=False)

    def claim(self, adapter_name: str) -> None:
        """Files the projections drawn last (``pending``) under ``adapter_name``, once."""
        if not self.has(adapter_name):
            if self.pending is None:
                raise RuntimeError(f"no projections were drawn for VeRA adapter {adapter_name!r}")
            self.add(adapter_name, *self.pending)

    def get(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"A_{adapter_name}"), getattr(self, f"B_{adapter_name}")

    def drop(self, adapter_name: str) -> None:
        for part in ("A", "B"):
            self._buffers.pop(f"{part}_{adapter_name}", None)

    def has(self, adapter_name: str) -> bool:
        return f"A_{adapter_name}" in self._buffers


class VeraLayer(DeltaLayer):
    """``h = W₀x + λ_b ⊙ (B·(λ_d ⊙ (A·x)))`` with the shared ``A``, ``B`` sliced to this layer."""

    peft_type = "VERA"
    adapter_containers = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module, projections: SharedProjections) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_projections = projections
        self.dropout: dict[str, float] = {}
        self.out_features, self.in_features = base_layer.weight.shape

    def add_adapter(self, adapter_name: str, config: VeraConfig, module_name: str) -> None:
        projections = getattr(config, "_projections", None)
        if projections is not self.vera_projections:
            raise RuntimeError(f"{module_name}: VeRA's shared projections were not prepared for this model; wrap it "
                               "with get_peft_model / add_adapter, which draws them for every target at once")
        projections.claim(adapter_name)
        a, b = self.vera_projections.get(adapter_name)
        if a.shape[1] < self.in_features or b.shape[0] < self.out_features or a.shape[0] != config.r:
            raise ValueError(f"{module_name}: the shared projections {tuple(a.shape)}, {tuple(b.shape)} do not cover "
                             f"this layer ({self.out_features} × {self.in_features}, r={config.r})")
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        if config.init_weights:
            lambda_b = torch.zeros(self.out_features)
            lambda_d = torch.full((config.r,), float(config.d_initial))
        else:
            lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(config.r)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b.to(device=weight.device, dtype=dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d.to(device=weight.device, dtype=dtype))
        self.dropout[adapter_name] = float(config.vera_dropout)

    def forget_adapter(self, adapter_name: str) -> None:
        super().forget_adapter(adapter_name)
        self.dropout.pop(adapter_name, None)
        self.vera_projections.drop(adapter_name)  # shared: every layer drops the adapter together

    def _sliced(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.vera_projections.get(adapter_name)
        dtype = self.vera_lambda_d[adapter_name].dtype
        return a[:, : self.in_features].to(dtype), b[: self.out_features].to(dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = diag(λ_b)·B·diag(λ_d)·A``."""
        a, b = self._sliced(adapter_name)
        lambda_b, lambda_d = self.vera_lambda_b[adapter_name], self.vera_lambda_d[adapter_name]
        return (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)

    def delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self._sliced(adapter_name)
        x = x.to(a.dtype)
        p = self.dropout[adapter_name]
        if p > 0:
            x = F.dropout(x, p, self.training)
        return self.vera_lambda_b[adapter_name] * F.linear(self.vera_lambda_d[adapter_name] * F.linear(x, a), b)


def create_vera_layer(module: nn.Module, adapter_name: str, config: VeraConfig, module_name: str) -> VeraLayer:
    """Wraps ``module`` with a VeRA layer holding adapter ``adapter_name``."""
    if not is_vera_supported(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; VeRA supports {SUPPORTED}")
    projections = getattr(config, "_projections", None)
    if projections is None:
        raise RuntimeError("VeRA's shared projections were not prepared; wrap the model with get_peft_model")
    layer = VeraLayer(module, projections)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
