"""LoRA layers: ``h = W₀x + (α/r)·B·A·x`` around linear, convolution and embedding modules.

Parameter containers carry PEFT's names (``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_embedding_B``, ``lora_magnitude_vector``) so saved keys match its files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import AdapterLayer, contiguous_rows
from peftkit.integrations.bitsandbytes import (
    dequantize,
    keep_cpu_layout_usable,
    quantized_kind,
    set_weight,
    to_float_linear,
)
from peftkit.integrations.transformers import is_transformers_conv1d
from peftkit.methods.lora import functional as LF
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.fused import add_lora_, lora_linear

__all__ = [
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "check_lora_target",
    "create_lora_layer",
    "is_lora_supported",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Base layers whose forward returns a new tensor that their backward does not keep.
_OWNED_OUTPUT_TYPES = (nn.Linear, nn.Embedding, *_CONV_TYPES)
SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding"


def _hooked(*modules: nn.Module) -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision bases keep their adapters in float32: small tensors, stable updates.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype


class LoraLayer(AdapterLayer):
    """State and lifecycle shared by the LoRA layer kinds."""

    peft_type = "LORA"
    adapter_containers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._merge_norms: dict[str, torch.Tensor] = {}
        self._trained_scaling: dict[str, float] = {}

    # -- kind-specific pieces (overridden) ---------------------------------------------
    def weight_view(self) -> torch.Tensor:
        """The base weight in the layout ``delta(name)`` returns (a view, not a copy)."""
        return self.base_layer.weight

    def write_weight(self, weight: torch.Tensor) -> None:
        """Stores a weight changed by merging (a no-op where ``weight_view`` is a view)."""

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        weight = self.base_layer.weight
        r = config.rank_for(module_name)
        if r > (most := full_rank(self.base_layer)):
            warnings.warn(
                f"{module_name}: r={r} is larger than the layer's smaller dimension ({most}), so the update "
                f"cannot reach rank {r} and the extra rank only adds parameters; use r <= {most} here "
                "(rank_pattern sets it per layer)",
                stacklevel=2,
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.alpha_for(module_name)
        self.scaling[adapter_name] = config.scaling_for(module_name)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        try:
            self.make_factors(adapter_name, r, _adapter_dtype(weight), weight.device)
            self.init_factors(adapter_name, config.init_lora_weights)
            if config.use_dora:
                self.init_dora(adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def forget_adapter(self, adapter_name: str) -> None:
        for d in (self.r, self.lora_alpha, self.scaling, self._merge_norms, self._trained_scaling):
            d.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    @torch.no_grad()
    def init_factors(self, name: str, init: bool | str) -> None:
        a, b = self.factors(name)
        if init is False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.normal_(b, std=0.02)
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r[name])
            nn.init.zeros_(b)
        elif isinstance(init, str) and init.startswith("pissa"):
            self.init_pissa(name)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def init_pissa(self, name: str) -> None:
        raise ValueError(f"init_lora_weights='pissa' needs a linear layer, not {type(self.base_layer).__name__}")

    @torch.no_grad()
    def init_dora(self, name: str) -> None:
        w = self.weight_view()
        norm = LF.dora_weight_norm(w.float() + self.delta(name).float())
        self.lora_magnitude_vector[name] = nn.Parameter(self.magnitude_shape(norm).to(self.factors(name)[0].dtype))

    def magnitude_shape(self, norm: torch.Tensor) -> torch.Tensor:
        return norm

    def magnitude_scale(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """``m / ‖W₀ + ΔW‖_c`` per output, the norm detached (as the DoRA paper advises)."""
        w = self.weight_view()
        norm = LF.dora_weight_norm(w + delta.to(w.dtype)).detach()
        return self.lora_magnitude_vector[name].flatten() / norm

    def scale_adapter(self, adapter_name: str, alpha: float) -> None:
        """``ΔW(α) = α·ΔW``: the scaling becomes α times its trained value."""
        if adapter_name in self.merged_adapters:
            raise RuntimeError("unmerge the adapter before scaling it")
        if adapter_name in self.lora_magnitude_vector:
            raise ValueError("a DoRA adapter is not additive and cannot be scaled; interpolate merged weights instead")
        trained = self._trained_scaling.setdefault(adapter_name, self.scaling[adapter_name])
        self.scaling[adapter_name] = trained * alpha

    # -- merging -----------------------------------------------------------------------
    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        w = self.weight_view()
        delta = self.delta(adapter_name).to(w.dtype)
        if adapter_name in self.lora_magnitude_vector:
            norm = LF.dora_weight_norm(w + delta)
            self._merge_norms[adapter_name] = norm
            scale = self.lora_magnitude_vector[adapter_name].flatten().to(w.dtype) / norm
            w.add_(delta).mul_(scale.view(-1, *([1] * (w.dim() - 1))))
        else:
            w.add_(delta)
        self.write_weight(w)

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        w = self.weight_view()
        delta = self.delta(adapter_name).to(w.dtype)
        if adapter_name in self.lora_magnitude_vector:
            norm = self._merge_norms.pop(adapter_name)
            scale = self.lora_magnitude_vector[adapter_name].flatten().to(w.dtype) / norm
            w.div_(scale.view(-1, *([1] * (w.dim() - 1)))).sub_(delta)
        else:
            w.sub_(delta)
        self.write_weight(w)

    # -- forward -----------------------------------------------------------------------
    def branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s·B·A·dropout(x)`` for one adapter."""
        # Scaled in place: B's output is a new tensor that B's backward does not keep.
        return self.unscaled_branch(name, x).mul_(self.scaling[name])

    def unscaled_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B·A·dropout(x)``."""
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))

    def add_branch(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self.addend(name, x, result)

    def addend(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output ``result``: ``s·B·A·x`` (DoRA: its
        correction of ``result``)."""
        x = x.to(self.factors(name)[0].dtype)
        if name in self.lora_magnitude_vector:
            return self.dora_correction(name, x, result)
        return self.branch(name, x).to(result.dtype)

    def dora_correction(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``h = b + (m/‖W₀+ΔW‖)·(W₀x + s·B·A·x)``, written as a correction added to ``result``."""
        scale = self.magnitude_scale(name, self.delta(name))
        shape = [1] * result.dim()
        shape[self.channel_dim(result)] = -1
        scale = scale.view(shape)
        bias = getattr(self.base_layer, "bias", None)
        base = result if bias is None else result - bias.view([-1 if i == self.channel_dim(result) else 1 for i in range(result.dim())])
        lora = self.unscaled_branch(name, x).to(result.dtype)
        # Added to result in this order, as Hugging Face PEFT does, outputs agree with PEFT's
        # within float32 rounding.
        return (scale - 1) * base + scale * lora * self.scaling[name]

    def channel_dim(self, result: torch.Tensor) -> int:
        return result.dim() - 1

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.example_adapters is not None:
            if self.add_per_example(x, result):
                return result
            # Each group's rows get result + addend, as in a batch of that adapter alone.
            in_place = self.owns_output(result)
            for name, idx in self.example_groups(x.shape[0]) or []:
                rows = contiguous_rows(idx) if in_place and name not in self.lora_magnitude_vector else None
                if rows is not None:
                    self.add_into(name, x[rows], result[rows])
                    continue
                idx = idx.to(x.device)
                result = result.index_add(0, idx, self.addend(name, x[idx], result[idx]))
            return result
        for name in self.adapters_to_run():
            if name in self.lora_magnitude_vector or not self.owns_output(result):
                result = self.add_branch(name, x, result)
            else:
                result = result.add_(self.addend(name, x, result))
        return result

    def add_per_example(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """Adds every example's adapter output to ``result`` in one step where the layer can
        (see ``LoraLinear``); False where the groups must be handled one by one."""
        return False

    def add_into(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += addend`` in place (``out`` being a base output this layer owns)."""
        out.add_(self.addend(name, x, out))

    def owns_output(self, result: torch.Tensor) -> bool:
        """Whether the base layer's output may be updated in place (same values as
        ``result + addend``, without a new tensor): the base is a plain torch layer, whose
        backward keeps its inputs but not its output, and no forward hook may hold the output."""
        # Only where autograd does not record: the output of a linear layer on a batch of
        # sequences is a view, and an in-place update of a view costs the backward pass a
        # copy of the whole output.
        return (not torch.is_grad_enabled() and type(self.base_layer) in _OWNED_OUTPUT_TYPES
                and not self.base_layer._forward_hooks)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` and on GPT-2's ``Conv1D`` (weight stored in × out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_transformers_conv1d(base_layer)
        # 4-/8-bit bases (bitsandbytes) store packed weights: their float weight is dequantised
        # on demand and merged weights are quantised again.
        self.quantized = quantized_kind(base_layer)
        keep_cpu_layout_usable(base_layer)
        if self.quantized or isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            w = base_layer.weight
            self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        # Conv1D's (in, out) weight, transposed, is the (out, in) weight of the same product.
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        return lora_linear(x, self.lora_dropout[name](x), weight, base.bias, a, b, self.scaling[name])

    def add_per_example(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """At inference, when every example has one of this layer's (non-DoRA) adapters, all
        of one rank and dtype, the examples' factors are stacked once per block and the
        adapter outputs accumulated into ``result`` by two batched products, instead of a
        handful of small operations per group (which dominate a decoding step)."""
        names = self.example_adapters
        if names is None or len(names) != x.shape[0] or not self.owns_output(result) or not result.is_contiguous():
            return False
        stacked = self.example_cache.get("stack", False)
        if stacked is False:
            stacked = self.example_cache["stack"] = self._stack_examples(names)
        if stacked is None:
            return False
        a, b, s = stacked
        if not (x.dtype == a.dtype == result.dtype):
            return False
        n = len(names)
        u = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2)).mul_(s)
        result.view(n, -1, result.shape[-1]).baddbmm_(u, b.transpose(1, 2))
        return True

    def _stack_examples(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(A, B, s)`` per example, ``(n, r, in)``, ``(n, out, r)``, ``(n, 1, 1)``; None
        where an example has no adapter here, a DoRA adapter, active dropout or another rank."""
        if self.quantized or self.merged_adapters:
            return None
        if any(name not in self.lora_A for name in names):
            return None
        for name in set(names):
            if name in self.lora_magnitude_vector or self.r[name] != self.r[names[0]]:
                return None
            if self.lora_dropout[name].training and not isinstance(self.lora_dropout[name], nn.Identity):
                return None
        a = torch.stack([self.lora_A[n].weight for n in names])
        b = torch.stack([self.lora_B[n].weight for n in names])
        s = torch.tensor([self.scaling[n] for n in names], dtype=a.dtype, device=a.device).view(-1, 1, 1)
        return a, b, s

    def add_into(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        a, b = self.factors(name)
        if self.quantized or not out.is_contiguous() or not (x.dtype == a.dtype == out.dtype):
            return super().add_into(name, x, out)
        add_lora_(out.view(-1, out.shape[-1]), self.lora_dropout[name](x).reshape(-1, x.shape[-1]), a, b, self.scaling[name])

    def fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter to run as one fused operation (`fused.lora_linear`), or None where the
        general path is needed: several or per-example adapters, DoRA, a base other than a
        plain frozen ``nn.Linear`` or transformers ``Conv1D``, hooks that expect the modules to be called, mixed dtypes
        or autocast."""
        if self.example_adapters is not None or args or kwargs:
            return None
        names = self.adapters_to_run()
        if len(names) != 1:
            return None
        name = names[0]
        base = self.base_layer
        plain = type(base) is nn.Linear or (self.fan_in_fan_out and type(base).__module__.startswith("transformers."))
        if not plain or name in self.lora_magnitude_vector:
            return None
        weight, bias = base.weight, base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        a, b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if not (x.dtype == weight.dtype == a.weight.dtype == b.weight.dtype) or _autocast_on(x.device.type):
            return None
        if _hooked(base, a, b, dropout):
            return None
        return name

    def weight_view(self) -> torch.Tensor:
        if self.quantized:
            return dequantize(self.base_layer)
        return self.base_layer.weight.T if self.fan_in_fan_out else self.base_layer.weight

    def write_weight(self, weight: torch.Tensor) -> None:
        if self.quantized:
            set_weight(self.base_layer, weight)

    def unload(self, merge: bool) -> nn.Module:
        """On a quantised base, merging gives a float ``nn.Linear``: dequantised W₀ plus the
        update, computed in float32 (so the merged model carries W₀'s quantisation error,
        but no second rounding)."""
        if not (merge and self.quantized):
            return super().unload(merge)
        self.base_layer = to_float_linear(self.base_layer)
        self.quantized = None
        return super().unload(merge)

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return LF.delta_weight(a, b, self.scaling[name])

    @torch.no_grad()
    def init_pissa(self, name: str) -> None:
        w = self.weight_view()
        a, b, residual = LF.pissa_factors(w, self.r[name], self.scaling[name])
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        w.copy_(residual)


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base's geometry and r output
    channels, B a 1×…×1 conv back to the output channels."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        conv = type(base)
        self.lora_A[name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, dtype=dtype, device=device,
        )
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, bias=False, dtype=dtype, device=device)

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return LF.conv_delta_weight(a, b, self.scaling[name])

    def magnitude_shape(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.view(1, -1, *([1] * (self.base_layer.weight.dim() - 2)))

    def channel_dim(self, result: torch.Tensor) -> int:
        return 1


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``E' = E + s·(B·A)ᵀ`` with A (r × vocab), B (dim × r)."""

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, vocab, dtype=dtype, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r, dtype=dtype, device=device))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    @torch.no_grad()
    def init_factors(self, name: str, init: bool | str) -> None:
        a, b = self.factors(name)
        if init is False:
            nn.init.normal_(a)
            nn.init.normal_(b)
        elif isinstance(init, str) and init.startswith("pissa"):
            self.init_pissa(name)
        else:  # the lookup of A is the input here, so A starts at zero and B random
            nn.init.zeros_(a)
            nn.init.normal_(b)

    def init_dora(self, name: str) -> None:
        raise ValueError("use_dora is supported on linear and convolution layers, not on nn.Embedding")

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return LF.embedding_delta_weight(a, b, self.scaling[name])

    def branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors(name)
        base = self.base_layer
        looked_up = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (looked_up @ b.T) * self.scaling[name]

    def addend(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return self.branch(name, x).to(result.dtype)


def is_lora_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, *_CONV_TYPES)) or is_transformers_conv1d(module)


def full_rank(base: nn.Module) -> int:
    """The highest rank a weight update of ``base`` can have: its weight's smaller dimension
    (a convolution's weight seen as out × in·kernel)."""
    if isinstance(base, nn.Embedding):
        return min(base.num_embeddings, base.embedding_dim)
    if isinstance(base, _CONV_TYPES):
        return min(base.out_channels, base.in_channels // base.groups * math.prod(base.kernel_size))
    if hasattr(base, "in_features") and hasattr(base, "out_features"):  # also quantised layers' packed weights
        return min(base.in_features, base.out_features)
    return min(base.weight.shape)  # transformers Conv1D


def check_lora_target(module: nn.Module, config: LoraConfig, module_name: str) -> None:
    """Raises when ``config`` cannot adapt ``module`` (the module itself, or the base of an
    existing LoRA layer). Runs for every target before the model is changed: PiSSA rewrites
    base weights, so a refusal found later could not be undone."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind = type(base).__name__
    if isinstance(base, _CONV_TYPES) and base.groups != 1:
        raise ValueError(f"{module_name}: LoRA on grouped convolutions (groups={base.groups}) is not supported")
    if config.use_dora and isinstance(base, nn.Embedding):
        raise ValueError(f"{module_name}: use_dora is supported on linear and convolution layers, not on nn.Embedding")
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith("pissa") and not (isinstance(base, nn.Linear) or is_transformers_conv1d(base)):
        raise ValueError(f"{module_name}: init_lora_weights='pissa' needs a linear layer, not {kind}")
    if isinstance(init, str) and init.startswith("pissa") and quantized_kind(base):
        raise ValueError(f"{module_name}: init_lora_weights='pissa' rewrites the base weight and needs a float layer, not a quantised {kind}")
    if isinstance(init, str) and init.startswith("pissa") and config.rank_for(module_name) > full_rank(base):
        raise ValueError(
            f"{module_name}: init_lora_weights='pissa' takes r={config.rank_for(module_name)} singular vectors, but the "
            f"layer has {full_rank(base)}; use r <= {full_rank(base)} here (rank_pattern sets it per layer)"
        )
    if config.fan_in_fan_out and isinstance(base, nn.Linear):
        raise ValueError(f"{module_name}: fan_in_fan_out=True but it is an nn.Linear (weight stored out × in)")


def create_lora_layer(module: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> LoraLayer:
    """Wraps ``module`` with a LoRA layer holding adapter ``adapter_name``."""
    check_lora_target(module, config, module_name)
    if isinstance(module, nn.Embedding):
        layer: LoraLayer = LoraEmbedding(module)
    elif isinstance(module, _CONV_TYPES):
        layer = LoraConv(module)
    elif isinstance(module, nn.Linear) or is_transformers_conv1d(module):
        layer = LoraLinear(module)
    else:
        raise TypeError(f"{module_name} is a {type(module).__name__}; LoRA supports {SUPPORTED}")
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
