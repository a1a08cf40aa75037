"""LoRA on ``nn.MultiheadAttention``: ``W_in = W₀_in + s·B·A`` (the packed query/key/value
projection) and ``W_out = W₀_out + s·B'·A'`` (the output projection).

The module computes with its weights directly (``F.multi_head_attention_forward``), calling
no submodule, so the update cannot be added to a submodule's output: the layer calls the
base with the updated weights in place of its own (``torch.func.functional_call``), which
leaves the base untouched and keeps autograd through the factors. File keys follow Hugging
Face PEFT: ``<attn>.lora_A.weight`` (r × E), ``<attn>.lora_B.weight`` (3E × r), and the output
projection's under ``<attn>.base_layer.out_proj.lora_A.weight``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.methods.lora import functional as LF
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layer import LoraLayer, _init_pair

__all__ = ["LoraMultiheadAttention", "check_attention_target"]

# Where PEFT keeps the output projection's factors, relative to the attention layer.
_OUT_PREFIX = "base_layer.out_proj."


def check_attention_target(base: nn.MultiheadAttention, config: LoraConfig, module_name: str) -> None:
    if not base._qkv_same_embed_dim:
        raise ValueError(f"{module_name}: LoRA on nn.MultiheadAttention needs kdim = vdim = embed_dim (one packed "
                         "in_proj_weight); this one projects keys and values from other widths")
    if config.use_dora:
        raise ValueError(f"{module_name}: use_dora is not supported on nn.MultiheadAttention (as in PEFT)")
    if not isinstance(base.out_proj, nn.Linear):
        raise ValueError(f"{module_name}: the attention's out_proj is a {type(base.out_proj).__name__}, not an nn.Linear")


class LoraMultiheadAttention(LoraLayer):
    """LoRA on the input and output projections of an ``nn.MultiheadAttention``.

    ``lora_dropout`` does not apply here: the update acts on the weights, not on an input
    of its own (as in PEFT).
    """

    adapter_containers = (*LoraLayer.adapter_containers, "out_proj_lora_A", "out_proj_lora_B")

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__(base_layer)
        self.out_proj_lora_A = nn.ModuleDict()
        self.out_proj_lora_B = nn.ModuleDict()

    def base_param(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def weight_view(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    def has_one_factor_pair(self) -> bool:
        return False

    def adapted_biases(self) -> list[str]:
        base = self.base_layer
        biases = (("base_layer.in_proj_bias", base.in_proj_bias), ("base_layer.out_proj.bias", base.out_proj.bias))
        return [name for name, b in biases if b is not None]

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        if config.lora_dropout > 0:
            warnings.warn(f"{module_name}: lora_dropout does not apply to nn.MultiheadAttention (the update acts on "
                          "its weights), as in PEFT", stacklevel=2)
        super().add_adapter(adapter_name, config, module_name)

    def make_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        e = self.base_layer.embed_dim
        self.lora_A[name] = nn.Linear(e, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, 3 * e, bias=False, dtype=dtype, device=device)
        self.out_proj_lora_A[name] = nn.Linear(e, r, bias=False, dtype=dtype, device=device)
        self.out_proj_lora_B[name] = nn.Linear(r, e, bias=False, dtype=dtype, device=device)

    @torch.no_grad()
    def init_factors(self, name: str, init: bool | str) -> None:
        super().init_factors(name, init)
        _init_pair(self.out_proj_lora_A[name].weight, self.out_proj_lora_B[name].weight, init, self.r[name],
                   pissa=lambda: self.init_pissa(name))

    def delta(self, name: str) -> torch.Tensor:
        """``s·B·A`` of the packed input projection (3E × E)."""
        return LF.delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def out_delta(self, name: str) -> torch.Tensor:
        """``s·B'·A'`` of the output projection (E × E)."""
        return LF.delta_weight(self.out_proj_lora_A[name].weight, self.out_proj_lora_B[name].weight, self.scaling[name])

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in super().adapter_state_dict(adapter_name).items():
            out[_OUT_PREFIX + key.removeprefix("out_proj_") if key.startswith("out_proj_") else key] = tensor
        return out

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.example_adapters is not None:
            raise NotImplementedError("per-example adapters (adapter_names) are not supported on nn.MultiheadAttention: "
                                      "run one adapter per batch there")
        names = self.adapters_to_run()
        base = self.base_layer
        if not names:
            return base(query, *args, **kwargs)
        w_in, w_out = base.in_proj_weight, base.out_proj.weight  # W₀
        for name in names:  # + (α/r)·B·A for each active adapter
            w_in = w_in + self.delta(name).to(w_in.dtype)
            w_out = w_out + self.out_delta(name).to(w_out.dtype)
        return functional_call(base, {"in_proj_weight": w_in, "out_proj.weight": w_out}, (query, *args), kwargs)

    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        base = self.base_layer
        base.in_proj_weight.add_(self.delta(adapter_name).to(base.in_proj_weight.dtype))
        base.out_proj.weight.add_(self.out_delta(adapter_name).to(base.out_proj.weight.dtype))

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        base = self.base_layer
        base.in_proj_weight.sub_(self.delta(adapter_name).to(base.in_proj_weight.dtype))
        base.out_proj.weight.sub_(self.out_delta(adapter_name).to(base.out_proj.weight.dtype))
