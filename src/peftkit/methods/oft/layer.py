"""OFT layers around ``nn.Linear``: the input rotated block by block, then the base layer.

The parameters live in ``oft_R.<adapter>.weight`` (blocks × b(b-1)/2), as in Hugging Face
PEFT. Merging folds the rotation into the weight, ``W' = W·Dᵀ`` with ``D = blockdiag(R)``;
unmerging solves it back (``R`` is orthogonal only up to the series' truncation, so the
inverse is computed, not transposed).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.methods.oft.config import OFTConfig

__all__ = ["SUPPORTED", "OFTLayer", "Rotation", "cayley", "create_oft_layer", "fit_divisor", "is_oft_supported"]

SUPPORTED = "nn.Linear"


def is_oft_supported(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def fit_divisor(size: int, wanted: int) -> int:
    """The divisor of ``size`` nearest ``wanted`` (the lower one on a tie; ``size`` when
    ``wanted`` is at least ``size``)."""
    if wanted >= size:
        return size
    higher = wanted
    while size % higher:
        higher += 1
    lower = wanted
    while lower > 1 and size % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def skew(q: torch.Tensor, block: int) -> torch.Tensor:
    """``Q = U - Uᵀ`` per row of ``q``, ``U`` the strictly upper triangle filled row by row."""
    rows, cols = torch.triu_indices(block, block, 1, device=q.device)
    upper = q.new_zeros(q.shape[0], block, block)
    upper[:, rows, cols] = q
    return upper - upper.transpose(-2, -1)


def cayley(q: torch.Tensor, block: int, neumann_terms: int | None) -> torch.Tensor:
    """The rotations (blocks × b × b) of the parameters ``q``.

    ``neumann_terms`` None: the exact ``R = (I - Q)(I + Q)⁻¹``. Else the series
    ``R = I + 2Q + 2Q² + … + 2Q^{n-2} + Q^{n-1}`` with n terms (at least up to Q³ once n > 2),
    which is ``(I + Q)(I - Q)⁻¹`` truncated."""
    skew_q = skew(q, block)
    eye = torch.eye(block, device=q.device, dtype=q.dtype).expand_as(skew_q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + skew_q, eye - skew_q, left=False)
    rot = eye.clone()
    if neumann_terms > 1:
        rot = rot + 2 * skew_q
    if neumann_terms > 2:
        power = skew_q @ skew_q
        rot = rot + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ skew_q
            rot = rot + 2 * power
        rot = rot + power @ skew_q
    return rot


class Rotation(nn.Module):
    """One adapter's parameters and how they rotate an input of ``features`` values."""

    def __init__(self, blocks: int, block_size: int, features: int, shared: bool, neumann_terms: int | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1 if shared else blocks, block_size * (block_size - 1) // 2))
        self.blocks, self.block_size, self.features = blocks, block_size, features
        self.neumann_terms = neumann_terms
        self.dropout = 0.0

    def rotations(self, dropout: bool = True) -> torch.Tensor:
        """The blocks × b × b rotations (``dropout``: with training-time block dropout)."""
        rot = cayley(self.weight, self.block_size, self.neumann_terms)
        if rot.shape[0] != self.blocks:
            rot = rot.expand(self.blocks, -1, -1)
        if dropout and self.training and self.dropout > 0 and self.blocks > 1:
            # multiplicative dropout: a share of the blocks become the identity for this step
            chosen = torch.randperm(self.blocks, device=rot.device)[: int(self.dropout * self.blocks)]
            eye = torch.eye(self.block_size, device=rot.device, dtype=rot.dtype)
            rot = rot.index_copy(0, chosen, eye.expand(len(chosen), -1, -1))
        return rot

    def matrix(self) -> torch.Tensor:
        """``D = blockdiag(R₁, …, R_k)`` (features × features): ``x ↦ x·D``."""
        return torch.block_diag(*self.rotations(dropout=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x·D`` computed block by block."""
        shape = x.shape
        blocks = x.to(self.weight.dtype).reshape(*shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", blocks, self.rotations()).reshape(shape)


class OFTLayer(AdapterLayer):
    """``h = W₀·(x·D) + b``: the base layer on the rotated input."""

    peft_type = "OFT"
    adapter_containers = ("oft_R",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()
        self.out_features, self.in_features = base_layer.weight.shape
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}

    def add_adapter(self, adapter_name: str, config: OFTConfig, module_name: str) -> None:
        features = self.in_features
        if config.r == 0:
            size = config.oft_block_size
            if features % size:
                size = fit_divisor(features, size)
                warnings.warn(f"{module_name}: oft_block_size {config.oft_block_size} does not divide the input size "
                              f"{features}; using {size}", stacklevel=3)
            blocks = features // size
        else:
            blocks = config.r
            if features % blocks:
                blocks = fit_divisor(features, blocks)
                warnings.warn(f"{module_name}: r={config.r} blocks do not divide the input size {features}; "
                              f"using {blocks}", stacklevel=3)
            size = features // blocks
        rotation = Rotation(blocks, size, features, config.block_share,
                            config.num_cayley_neumann_terms if config.use_cayley_neumann else None)
        rotation.dropout = float(config.module_dropout)
        if not config.init_weights:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.oft_R[adapter_name] = rotation.to(device=weight.device, dtype=dtype)
        self.r[adapter_name], self.oft_block_size[adapter_name] = blocks, size

    def forget_adapter(self, adapter_name: str) -> None:
        self.r.pop(adapter_name, None)
        self.oft_block_size.pop(adapter_name, None)

    def _rotate(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.oft_R[name](x)
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        groups = self.example_groups(x.shape[0])
        if groups is not None:
            result = self.base_layer(x, *args, **kwargs)
            for name, idx in groups:
                idx = idx.to(x.device)
                rotated = self._rotate([name], x[idx]).to(x.dtype)
                result = result.index_copy(0, idx, self.base_layer(rotated, *args, **kwargs))
            return result
        names = self.adapters_to_run()
        if names:
            x = self._rotate(names, x).to(x.dtype)
        return self.base_layer(x, *args, **kwargs)

    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        weight = self.base_layer.weight
        rotation = self.oft_R[adapter_name].matrix()
        weight.copy_((weight.to(rotation.dtype) @ rotation.T).to(weight.dtype))

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        weight = self.base_layer.weight
        rotation = self.oft_R[adapter_name].matrix().to(torch.float64)
        # W = W'·(Dᵀ)⁻¹, solved in double precision
        restored = torch.linalg.solve(rotation.T, weight.to(torch.float64), left=False)
        weight.copy_(restored.to(weight.dtype))


def create_oft_layer(module: nn.Module, adapter_name: str, config: OFTConfig, module_name: str) -> OFTLayer:
    """Wraps ``module`` with an OFT layer holding adapter ``adapter_name``."""
    if not is_oft_supported(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; OFT supports {SUPPORTED} "
                        "(convolutions are not adapted: their rotated patches do not fold back into the kernel)")
    layer = OFTLayer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
