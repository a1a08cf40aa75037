"""LoRA on a bare ``nn.Parameter`` (``target_parameters``): ``W = W₀ + (α/r)·B·A`` for a
weight no linear layer holds, such as the stacked expert weights of a mixture-of-experts
block (one tensor ``(experts, d₁, d₂)``).

The module holding the parameter runs with ``W₀ + ΔW`` in its place
(``torch.func.functional_call``), so any module's own use of its weight sees the update.
For ``E`` experts the factors hold one rank-r pair per expert, as Hugging Face PEFT stores
them: A is ``(E·r, d₂)`` (expert-major rows), B ``(d₁, E·r)`` (rank-major columns), and
``ΔW[e] = s·B_e·A_e`` — or, where the module marks its weights ``is_transposed``,
A ``(E·r, d₁)``, B ``(d₂, E·r)`` and ``ΔW[e] = s·(B_e·A_e)ᵀ``. A 2-D parameter is one expert.

Several parameters of one module get one layer each, nested in the order the module
registers them (the first innermost), as PEFT nests its wrappers: the file keys of the
second are ``<module>.lora_A.weight``, of the first ``<module>.base_layer.lora_A.weight``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.layer import AdapterLayer
from peftkit.core.targeting import TargetError, name_matches
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layer import LoraLayer

__all__ = ["LoraParameter", "check_parameter_target", "create_parameter_layers", "parameter_delta", "parameter_owners",
           "targeted_parameters"]


def parameter_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, experts: int, transposed: bool) -> torch.Tensor:
    """``ΔW`` of a parameter from its factors (see the module docstring for the layouts)."""
    if experts == 1 and not transposed:
        return (b @ a) * scaling
    r = a.shape[0] // experts
    a_e = a.reshape(experts, r, a.shape[-1])  # (E, r, ·)
    b_e = b.reshape(b.shape[0], r, experts).permute(2, 0, 1)  # (E, ·, r)
    delta = torch.bmm(b_e, a_e) * scaling
    return delta.transpose(1, 2) if transposed else delta


def owner_of(module: nn.Module) -> nn.Module:
    """The module that holds the parameters, under any layers of this kind around it."""
    while isinstance(module, LoraParameter):
        module = module.base_layer
    return module


def targeted_parameters(module: nn.Module, config: LoraConfig, module_name: str) -> list[str]:
    """The names of ``module``'s own parameters that ``config.target_parameters`` names, in
    registration order (``module_name.param`` equal to an entry or ending with ``.entry``)."""
    entries = getattr(config, "target_parameters", None) or []
    return [p for p in owner_of(module)._parameters
            if any(name_matches(f"{module_name}.{p}", e) for e in entries)]


def _shape(param: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """``(experts, rows of B, columns of A)``."""
    if param.dim() == 2:
        return 1, param.shape[0], param.shape[1]
    experts, d1, d2 = param.shape
    return (experts, d2, d1) if transposed else (experts, d1, d2)


def check_parameter_target(module: nn.Module, config: LoraConfig, module_name: str) -> None:
    """Raises where ``config`` cannot adapt the parameters it names on ``module``."""
    names = targeted_parameters(module, config, module_name)
    reasons = [(config.lora_dropout > 0, "lora_dropout > 0 (the update acts on the weight, with no input of its own)"),
               (config.use_dora, "use_dora"), (config.fan_in_fan_out, "fan_in_fan_out"),
               (isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith("pissa"), "init_lora_weights='pissa'")]
    for refused, what in reasons:
        if refused:
            raise ValueError(f"{module_name}: LoRA on parameters (target_parameters) does not support {what}, as in PEFT")
    if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
        raise ValueError(f"{module_name} is already adapted through target_modules; a module is targeted by "
                         "target_modules or holds target_parameters, not both")
    if isinstance(module, LoraParameter):
        wrapped = module.parameter_names()
        if sorted(wrapped) != sorted(names):
            raise ValueError(f"{module_name}: its LoRA layers adapt the parameters {wrapped}, this config names {names}; "
                             "every adapter of a module must target the same parameters (as in PEFT)")
    for p in names:
        param = getattr(owner_of(module), p)
        if param.dim() not in (2, 3):
            raise ValueError(f"{module_name}.{p}: LoRA adapts 2-D weights and 3-D stacks of expert weights, "
                             f"not a parameter of shape {tuple(param.shape)}")


def create_parameter_layers(module: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> LoraParameter:
    """Wraps ``module`` in one layer per targeted parameter (the first innermost), each holding
    adapter ``adapter_name``."""
    check_parameter_target(module, config, module_name)
    layer: nn.Module = module
    for p in targeted_parameters(module, config, module_name):
        layer = LoraParameter(layer, p)
    assert isinstance(layer, LoraParameter)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer


class LoraParameter(LoraLayer):
    """LoRA on one parameter ``parameter_name`` of the module it wraps."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        param = self.param()
        self.transposed = param.dim() == 3 and bool(getattr(owner_of(base_layer), "is_transposed", False))
        self.experts, self.rows, self.columns = _shape(param, self.transposed)

    # -- what it adapts --------------------------------------------------------------------
    def param(self) -> torch.Tensor:
        return getattr(owner_of(self.base_layer), self.parameter_name)

    def parameter_names(self) -> list[str]:
        """The parameters the layers of this chain adapt, innermost first."""
        inner = self.base_layer.parameter_names() if isinstance(self.base_layer, LoraParameter) else []
        return [*inner, self.parameter_name]

    def _path(self) -> str:
        """The parameter's name relative to ``base_layer``."""
        module, path = self.base_layer, ""
        while isinstance(module, LoraParameter):
            module, path = module.base_layer, path + "base_layer."
        return path + self.parameter_name

    def base_param(self) -> torch.Tensor:
        return self.param()

    def weight_view(self) -> torch.Tensor:
        return self.param()

    @property
    def weight(self) -> torch.Tensor:
        return getattr(owner_of(self.base_layer), "weight", self.param())

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(owner_of(self.base_layer), "bias", None)

    def has_one_factor_pair(self) -> bool:
        return False

    def adapted_biases(self) -> list[str]:
        return []

    def full_rank(self) -> int:
        return min(self.rows, self.columns)

    # -- lifecycle along the chain ------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        """Adds the adapter here and to the layers inside (the core calls the outermost)."""
        if isinstance(self.base_layer, LoraParameter):
            self.base_layer.add_adapter(adapter_name, config, module_name)
        try:
            super().add_adapter(adapter_name, config, module_name)
        except Exception:
            if isinstance(self.base_layer, LoraParameter):
                self.base_layer.delete_adapter(adapter_name)
            raise

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if isinstance(self.base_layer, LoraParameter):
            self.base_layer.delete_adapter(adapter_name)

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[name] = nn.Linear(self.columns, r * self.experts, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r * self.experts, self.rows, bias=False, dtype=dtype, device=device)

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return parameter_delta(a, b, self.scaling[name], self.experts, self.transposed)

    # -- forward: the module with W₀ + ΔW ----------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.example_adapters is not None:
            raise NotImplementedError("per-example adapters (adapter_names) are not supported on target_parameters: "
                                      "run one adapter per batch there")
        names = self.adapters_to_run()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        w = self.param()  # W₀
        for name in names:  # + (α/r)·B·A for each active adapter
            w = w + self.delta(name).to(w.dtype)
        return functional_call(self.base_layer, {self._path(): w}, (x, *args), kwargs)


def parameter_owners(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules holding the parameters ``config.target_parameters`` names, in model order.

    Raises:
        TargetError: when an entry names no parameter, or a parameter of the top-level module.
    """
    entries = list(getattr(config, "target_parameters", None) or [])
    if not entries:
        return []
    found: list[str] = []
    matched: set[str] = set()
    inside: list[str] = []  # adapter layers: their insides are not the model's modules
    for name, module in model.named_modules():
        if any(name.startswith(i + ".") for i in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name)
            if not isinstance(module, LoraParameter):  # the outermost of a chain stands for its module
                continue
        for p in owner_of(module)._parameters:
            hits = [e for e in entries if name_matches(f"{name}.{p}" if name else p, e)]
            if not hits:
                continue
            if not name:
                raise TargetError(f"target_parameters {hits} name {p!r} of the top-level module, which LoRA cannot "
                                  "wrap; name a parameter of a submodule")
            matched.update(hits)
            if name not in found:
                found.append(name)
    missing = [e for e in entries if e not in matched]
    if not found:
        raise TargetError(f"target_parameters {entries} matched no parameter of {type(model).__name__}; name them as "
                          "'<module path or suffix>.<parameter>', e.g. 'experts.gate_up_proj'")
    if missing:
        warnings.warn(f"target_parameters entries {missing} matched no parameter; the others were applied", stacklevel=3)
    return found
