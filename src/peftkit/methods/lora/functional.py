"""LoRA math as pure functions on tensors."""

from __future__ import annotations

import torch

__all__ = [
    "conv_delta_weight",
    "delta_weight",
    "dora_weight_norm",
    "embedding_delta_weight",
    "pissa_factors",
]


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``ΔW = s·B·A`` with A (r × in), B (out × r); transposed to (in × out) when the base
    weight is stored that way (``fan_in_fan_out``)."""
    delta = (lora_b @ lora_a) * scaling
    return delta.T if fan_in_fan_out else delta


def conv_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW`` of a convolution: A is a conv (r, in, *kernel), B a 1×…×1 conv (out, r, 1, …);
    their composition is the conv with weight ``s·B·A`` contracted over r."""
    r = lora_a.shape[0]
    return (lora_b.reshape(lora_b.shape[0], r) @ lora_a.reshape(r, -1)).reshape(
        lora_b.shape[0], *lora_a.shape[1:]
    ) * scaling


def embedding_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔE = s·(B·A)ᵀ`` with A (r × vocab), B (dim × r): a (vocab × dim) table."""
    return (lora_b @ lora_a).T * scaling


def dora_weight_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each output's weights, ``‖W‖_c``: over every dimension but the first."""
    return weight.flatten(1).norm(p=2, dim=1)


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA initialisation from the top-r singular triplets of W (out × in).

    ``W = U S Vᵀ``; with ``S_r`` the top r values divided by the scaling s,
    ``A = √S_r · V_rᵀ`` and ``B = U_r · √S_r``, so that ``s·B·A`` is the best rank-r part of W.

    Returns:
        ``(A, B, residual)`` where ``residual = W - s·B·A`` replaces the base weight.
    """
    w = weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sr = s[:r] / scaling
    root = sr.sqrt()
    lora_a = root[:, None] * vh[:r]
    lora_b = u[:, :r] * root[None, :]
    residual = w - scaling * (lora_b @ lora_a)
    return lora_a, lora_b, residual.to(weight.dtype)
