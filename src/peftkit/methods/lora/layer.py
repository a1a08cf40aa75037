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

from peftkit.core.layer import AdapterLayer
from peftkit.integrations.bitsandbytes import (
    dequantize,
    keep_cpu_layout_usable,
    quantized_kind,
    set_weight,
    to_float_linear,
)
from peftkit.integrations.transformers import is_transformers_conv1d
from peftkit.methods.lora import batched
from peftkit.methods.lora import functional as LF
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.fused import add_lora_, lora_linear
from peftkit.methods.lora.variants import Dora, LoraVariant

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
SUPPORTED = ("nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d (grouped too), nn.Embedding, "
             "nn.MultiheadAttention; any nn.Parameter through target_parameters")


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
    """State and lifecycle shared by the LoRA layer kinds: ``h = W₀x + (α/r)·B·A·x``.

    A kind (linear, convolution, embedding...) says how its factors are made and applied
    (``make_factors``, ``unscaled_update``, ``delta``); a variant such as DoRA
    (``variants.py``) says how an adapter departs from the formula; the inference fast paths
    for mixed-adapter batches are pure functions (``batched.py``, ``fused.py``).
    """

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
        # The variant of each adapter that is not plain LoRA (DoRA...).
        self.lora_variant: dict[str, LoraVariant] = {}
        self._trained_scaling: dict[str, float] = {}

    # -- the formula ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # W₀x (+ b)
        if self.example_adapters is not None:  # a different adapter for each example
            return self.forward_per_example(x, result)
        for name in self.adapters_to_run():  # + (α/r)·B·A·x, for each active adapter
            update = self.addend(name, x, result)
            result = result.add_(update) if self.owns_output(result) else result + update
        return result

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``(α/r)·B·A·dropout(x)`` for one adapter."""
        # Scaled in place: B's output is a new tensor that B's backward does not keep.
        return self.unscaled_update(name, x).mul_(self.scaling[name])

    def unscaled_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B·A·dropout(x)``, in the adapter's dtype."""
        x = x.to(self.lora_A[name].weight.dtype)
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))

    def addend(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``result``: ``(α/r)·B·A·x``, or what
        its variant adds."""
        variant = self.lora_variant.get(name)
        if variant is not None:
            return variant.addend(self, name, x, result)
        return self.update(name, x).to(result.dtype)

    # -- kind-specific pieces (overridden) ---------------------------------------------
    def weight_view(self) -> torch.Tensor:
        """The base weight in the layout ``delta(name)`` returns (a view, not a copy)."""
        return self.base_layer.weight

    def write_weight(self, weight: torch.Tensor) -> None:
        """Stores a weight changed by merging (a no-op where ``weight_view`` is a view)."""

    def out_major(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (as ``weight_view`` lays it out) as a view with one row per output
        channel, the layout of DoRA's norms and magnitudes."""
        return weight

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def magnitude_shape(self, norm: torch.Tensor) -> torch.Tensor:
        """DoRA's magnitudes in the shape PEFT stores them."""
        return norm

    def channel_dim(self, result: torch.Tensor) -> int:
        """The dimension of the output channels in the base output."""
        return result.dim() - 1

    def variant_for(self, config: LoraConfig) -> LoraVariant | None:
        """The variant an adapter of ``config`` gets here (None: plain LoRA)."""
        return Dora() if config.use_dora else None

    # -- lifecycle ---------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        weight = self.base_param()
        r = config.rank_for(module_name)
        if r > (most := self.full_rank()):
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
            variant = self.variant_for(config)
            if variant is not None:
                self.lora_variant[adapter_name] = variant
                variant.init(self, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def base_param(self) -> torch.Tensor:
        """The base tensor whose dtype and device the adapter takes."""
        return self.base_layer.weight

    def has_one_factor_pair(self) -> bool:
        """Whether the update is the one factor pair ``(A, B)`` of ``factors`` with
        ``ΔW = s·B·A`` (A and B flattened, rank r between them), as combining and adaptive
        rank allocation need."""
        return True

    def full_rank(self) -> int:
        """The highest rank an update here can have."""
        return full_rank(self.base_layer)

    def adapted_biases(self) -> list[str]:
        """The biases of what the adapter updates, relative to the layer (``bias="lora_only"``)."""
        return ["base_layer.bias"] if getattr(self.base_layer, "bias", None) is not None else []

    def forget_adapter(self, adapter_name: str) -> None:
        variant = self.lora_variant.pop(adapter_name, None)
        if variant is not None:
            variant.forget(self, adapter_name)
        for d in (self.r, self.lora_alpha, self.scaling, self._trained_scaling):
            d.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    @torch.no_grad()
    def init_factors(self, name: str, init: bool | str) -> None:
        _init_pair(*self.factors(name), init, self.r[name], pissa=lambda: self.init_pissa(name))

    def init_pissa(self, name: str) -> None:
        raise ValueError(f"init_lora_weights='pissa' needs a linear layer, not {type(self.base_layer).__name__}")

    def scale_adapter(self, adapter_name: str, alpha: float) -> None:
        """``ΔW(α) = α·ΔW``: the scaling becomes α times its trained value."""
        if adapter_name in self.merged_adapters:
            raise RuntimeError("unmerge the adapter before scaling it")
        variant = self.lora_variant.get(adapter_name)
        if variant is not None and not variant.scalable:
            raise ValueError(f"a {variant.name} adapter is not additive and cannot be scaled; interpolate merged weights instead")
        trained = self._trained_scaling.setdefault(adapter_name, self.scaling[adapter_name])
        self.scaling[adapter_name] = trained * alpha

    # -- merging: W = W₀ + (α/r)·B·A -----------------------------------------------------
    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        w = self.weight_view()
        delta = self.delta(adapter_name).to(w.dtype)
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            w.add_(delta)
        else:
            variant.merge(self, adapter_name, w, delta)
        self.write_weight(w)

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        w = self.weight_view()
        delta = self.delta(adapter_name).to(w.dtype)
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            w.sub_(delta)
        else:
            variant.unmerge(self, adapter_name, w, delta)
        self.write_weight(w)

    # -- mixed-adapter batches (see batched.py) ------------------------------------------
    def forward_per_example(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus each example's adapter term, as in a batch of that adapter alone."""
        if self.add_per_example(x, result):
            return result
        in_place = self.owns_output(result)
        groups = [(name, idx, in_place and name not in self.lora_variant)
                  for name, idx in self.example_groups(x.shape[0]) or []]
        return batched.add_groups(result, x, groups, self.addend, self.add_rows_)

    def add_per_example(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """Adds every example's adapter term to ``result`` in one step where the layer can
        (see ``LoraLinear``); False where the groups must be handled one by one."""
        return False

    def add_rows_(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
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


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int, pissa: Any) -> None:
    """PEFT's initialisations of a factor pair A (r × in), B (out × r)."""
    if init is False:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.normal_(b, std=0.02)
    elif init == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
        nn.init.zeros_(b)
    elif isinstance(init, str) and init.startswith("pissa"):
        pissa()
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


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
        """At inference, when every example has one of this layer's plain adapters, all of
        one rank and dtype: the stacked path of ``batched.py`` (factors stacked once per
        block, two batched products)."""
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
        batched.add_stacked_(result, x, a, b, s)
        return True

    def _stack_examples(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``batched.stack_factors`` of the examples' adapters; None where an example has no
        adapter here, a variant, active dropout or another rank."""
        if self.quantized or self.merged_adapters:
            return None
        if any(name not in self.lora_A for name in names):
            return None
        for name in set(names):
            if name in self.lora_variant or self.r[name] != self.r[names[0]]:
                return None
            if self.lora_dropout[name].training and not isinstance(self.lora_dropout[name], nn.Identity):
                return None
        return batched.stack_factors([self.lora_A[n].weight for n in names], [self.lora_B[n].weight for n in names],
                                     [self.scaling[n] for n in names])

    def add_rows_(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        a, b = self.factors(name)
        if self.quantized or not out.is_contiguous() or not (x.dtype == a.dtype == out.dtype):
            return super().add_rows_(name, x, out)
        add_lora_(out.view(-1, out.shape[-1]), self.lora_dropout[name](x).reshape(-1, x.shape[-1]), a, b, self.scaling[name])

    def fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter to run as one fused operation (`fused.lora_linear`), or None where the
        general path is needed: several or per-example adapters, a variant (DoRA), a base other than a
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
        if not plain or name in self.lora_variant:
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
    channels, B a 1×…×1 conv back to the output channels.

    On a grouped (or depth-wise) convolution, as in PEFT, A sees every input channel and B is
    grouped like the base: group g's outputs read r/groups of A's channels. The update then
    connects every input channel to every output, which the base's grouped kernel cannot
    hold, so such an adapter runs beside the base and is never merged into it.
    """

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        conv = type(base)
        self.lora_A[name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, dtype=dtype, device=device,
        )
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, groups=base.groups, bias=False, dtype=dtype, device=device)

    def has_one_factor_pair(self) -> bool:
        return self.base_layer.groups == 1

    def check_mergeable(self, adapter_names: Sequence[str] | None = None) -> None:
        if self.base_layer.groups != 1:
            raise NotImplementedError(
                f"LoRA on a grouped convolution (groups={self.base_layer.groups}) cannot be merged into the base "
                "weights: its update connects every input channel to every output, which a grouped kernel cannot "
                "hold. Keep the adapter unmerged (unload() removes it)."
            )

    def merge_one(self, adapter_name: str) -> None:
        self.check_mergeable()
        super().merge_one(adapter_name)

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

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return LF.embedding_delta_weight(a, b, self.scaling[name])

    def out_major(self, weight: torch.Tensor) -> torch.Tensor:
        # The table is vocab × dim; an output channel is a column (DoRA's norms run over the vocabulary).
        return weight.T

    def unscaled_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B·A`` looked up: row ``x`` of ``(B·A)ᵀ``."""
        a, b = self.factors(name)
        base = self.base_layer
        looked_up = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return looked_up @ b.T


def is_lora_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, nn.MultiheadAttention, *_CONV_TYPES)) or is_transformers_conv1d(module)


def full_rank(base: nn.Module) -> int:
    """The highest rank a weight update of ``base`` can have: its weight's smaller dimension
    (a convolution's weight seen as out × in·kernel)."""
    if isinstance(base, nn.Embedding):
        return min(base.num_embeddings, base.embedding_dim)
    if isinstance(base, _CONV_TYPES):  # grouped too: LoRA's update of a grouped conv is a dense one
        return min(base.out_channels, base.in_channels * math.prod(base.kernel_size))
    if isinstance(base, nn.MultiheadAttention):
        return base.embed_dim
    if hasattr(base, "in_features") and hasattr(base, "out_features"):  # also quantised layers' packed weights
        return min(base.in_features, base.out_features)
    return min(base.weight.shape)  # transformers Conv1D


def check_lora_target(module: nn.Module, config: LoraConfig, module_name: str) -> None:
    """Raises when ``config`` cannot adapt ``module`` (the module itself, or the base of an
    existing LoRA layer). Runs for every target before the model is changed: PiSSA rewrites
    base weights, so a refusal found later could not be undone."""
    if _holds_targeted_parameters(module, config, module_name):
        from peftkit.methods.lora.parameter import check_parameter_target

        return check_parameter_target(module, config, module_name)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind = type(base).__name__
    if isinstance(base, _CONV_TYPES) and base.groups != 1:
        r = config.rank_for(module_name)
        if r % base.groups:
            raise ValueError(
                f"{module_name}: a {kind} with groups={base.groups} needs a rank divisible by {base.groups} (each "
                f"group of outputs reads r/groups of the update's channels), got r={r}; use r={base.groups * max(1, r // base.groups)} "
                "here (rank_pattern sets it per layer)"
            )
        if config.use_dora:
            raise ValueError(f"{module_name}: use_dora is not supported on grouped convolutions (groups={base.groups}): "
                             "the update is not a grouped kernel, so W₀ + ΔW has no per-output norm to rescale")
    if isinstance(base, nn.MultiheadAttention):
        from peftkit.methods.lora.attention import check_attention_target

        check_attention_target(base, config, module_name)
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
    if _holds_targeted_parameters(module, config, module_name):
        from peftkit.methods.lora.parameter import create_parameter_layers

        return create_parameter_layers(module, adapter_name, config, module_name)
    check_lora_target(module, config, module_name)
    if isinstance(module, nn.Embedding):
        layer: LoraLayer = LoraEmbedding(module)
    elif isinstance(module, nn.MultiheadAttention):
        from peftkit.methods.lora.attention import LoraMultiheadAttention

        layer = LoraMultiheadAttention(module)
    elif isinstance(module, _CONV_TYPES):
        layer = LoraConv(module)
    elif isinstance(module, nn.Linear) or is_transformers_conv1d(module):
        layer = LoraLinear(module)
    else:
        raise TypeError(f"{module_name} is a {type(module).__name__}; LoRA supports {SUPPORTED}")
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer


def _holds_targeted_parameters(module: nn.Module, config: LoraConfig, module_name: str) -> bool:
    """Whether ``module`` is adapted through ``target_parameters`` (its own parameters)."""
    if not getattr(config, "target_parameters", None):
        return False
    from peftkit.methods.lora.parameter import LoraParameter, targeted_parameters

    return isinstance(module, LoraParameter) or bool(targeted_parameters(module, config, module_name))

