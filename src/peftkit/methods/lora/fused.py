"""One LoRA linear layer as a single operation: ``y = W₀x + b + s·B·(A·dropout(x))``.

Written with separate torch modules, an adapter adds an autograd node per factor, a scaling
node and an addition node, each reading and writing a tensor of the layer's full output
width, in the forward pass and again in the backward pass. Here the adapter's product is
accumulated into the base output by the matrix multiply itself (``addmm_`` with β = 1), the
scaling is applied to rank-r tensors only, and the backward pass accumulates the adapter's
input gradient into the base's (again with ``addmm_``). The arithmetic is the same; only the
last bits of a sum may round differently (how much depends on the BLAS kernels of the CPU
or GPU, whatever the scaling), so the two paths agree within float32 rounding.

The base weight and bias must be frozen: their gradients are not computed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["add_lora_", "lora_linear"]


def add_lora_(out: torch.Tensor, xd: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out += scaling · (xd·Aᵀ)·Bᵀ`` in place, for 2-D ``out`` (n × out) and ``xd`` (n × in);
    returns ``u = xd·Aᵀ``."""
    u = torch.mm(xd, a.t())
    out.addmm_(u, b.t(), alpha=scaling)
    return u


def _forward(x2: torch.Tensor, xd2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = F.linear(x2, weight, bias)
    return out, add_lora_(out, xd2, a, b, scaling)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        same = xd is x
        xd2 = x2 if same else xd.reshape(-1, xd.shape[-1])
        out, u = _forward(x2, xd2, weight, bias, a, b, scaling)
        ctx.save_for_backward(xd2, u, weight, a, b)
        ctx.same, ctx.scaling, ctx.lead = same, scaling, lead
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xd2, u, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        du = torch.mm(g, b).mul_(s)
        need_x, need_xd, _, _, need_a, need_b, _ = ctx.needs_input_grad
        grad_a = torch.mm(du.t(), xd2) if need_a else None
        # (uᵀg)ᵀ: MKL computes this layout about twice as fast as gᵀu.
        grad_b = torch.mm(u.t(), g).mul_(s).t() if need_b else None
        grad_x = grad_xd = None
        if need_x:
            grad_x = torch.mm(g, weight)
            if ctx.same:
                grad_x.addmm_(du, a)
            grad_x = grad_x.view(*ctx.lead, grad_x.shape[-1])
        if need_xd and not ctx.same:
            grad_xd = torch.mm(du, a).view(*ctx.lead, a.shape[-1])
        return grad_x, grad_xd, None, None, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling · F.linear(F.linear(xd, a), b)`` for a frozen
    ``weight``/``bias``; ``xd`` is ``x`` after the adapter's dropout (``x`` itself without)."""
    if torch.is_grad_enabled() and (x.requires_grad or xd.requires_grad or a.requires_grad or b.requires_grad):
        return _LoraLinear.apply(x, xd, weight, bias, a, b, scaling)
    x2 = x.reshape(-1, x.shape[-1])
    xd2 = x2 if xd is x else xd.reshape(-1, xd.shape[-1])
    out, _ = _forward(x2, xd2, weight, bias, a, b, scaling)
    return out.view(*x.shape[:-1], out.shape[-1])
