"""Any mergeable adapter as a LoRA of a chosen rank: the truncated SVD of its weight delta.

Servers and pipelines that only load LoRA (vLLM, diffusers, most inference stacks) can then
take the result of any method that changes weights: (IA)³, sparse deltas, a LoRA of
another rank, and every method whose layers merge. For each adapted module

    ΔW = W' − W₀ = U·S·Vᵀ,   B = U_r·√S_r / √s,   A = √S_r·V_rᵀ / √s,

so that ``s·B·A`` (s = α/r) is the best rank-r approximation of ΔW (Eckart–Young), and the
relative error ``‖ΔW − s·B·A‖_F / ‖ΔW‖_F = √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²)`` is reported per
module. Where r is at least the rank of ΔW the LoRA is exact (up to float32 rounding).

Weight deltas come from :func:`peftkit.core.weight_delta.weight_delta`, which asks nothing of a
layer but that it merges, so a new method's layers convert without changes here.
Convolutions (ΔW seen as out × in·kernel), embeddings and GPT-2's ``Conv1D`` are handled
as LoRA itself handles them. A bias the adapter changes ((IA)³ scaling a layer's outputs
scales its bias too) is kept exactly by a LoRA with ``bias="lora_only"`` (the default,
``bias="auto"``), or dropped (``bias="none"``, what LoRA-only servers load) with its
relative error reported.

Adapters that train the model's own weights in place (full and layer-wise fine-tuning)
convert too: their deltas are the trained weights minus the originals (kept with
``keep_original``, or given as ``pretrained=``); modules LoRA cannot adapt (LayerNorms) are
carried whole in ``modules_to_save``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.inplace import InPlaceAdapter
from peftkit.core.layer import adapter_layers
from peftkit.core.modules_to_save import ModulesToSaveWrapper
from peftkit.core.tuner import adapter_base_parameter_names
from peftkit.core.weight_delta import NotMergeableError, is_mergeable, weight_delta
from peftkit.integrations.transformers import is_transformers_conv1d
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layer import check_lora_target, full_rank

__all__ = ["ConversionError", "LayerConversion", "LoraConversion", "convert_to_lora"]

PREFIX = "base_model.model."
REPORT_NAME = "conversion.json"
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The modules whose LoRA is one factor pair s·B·A over the weight seen as a matrix.
CONVERTIBLE = "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d (groups=1), nn.Embedding"


def _convertible(module: nn.Module) -> bool:
    if isinstance(module, _CONV_TYPES):
        return module.groups == 1
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_transformers_conv1d(module)


class ConversionError(ValueError):
    """An adapter that cannot be expressed as a LoRA (or a request that cannot be met)."""


@dataclass
class LayerConversion:
    """How well one module's weight delta is kept.

    Args:
        name: the module's path in the model.
        shape: the weight delta as a matrix (out × in·kernel; dim × vocab for embeddings).
        rank: the rank of the LoRA written for it.
        delta_rank: the numerical rank of the delta (singular values above float32 noise).
        relative_error: ``‖ΔW − s·B·A‖_F / ‖ΔW‖_F`` (0 for a zero delta).
        bias_error: with ``bias="none"``, ``‖Δb‖ / ‖b'‖`` of the bias change dropped; else 0.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    delta_rank: int
    relative_error: float
    bias_error: float = 0.0


@dataclass
class LoraConversion:
    """The converted adapter: a ``LoraConfig``, its tensors (adapter-file keys) and the report."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    layers: list[LayerConversion]
    source_type: str
    carried: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        """The largest relative error over the modules (weights and dropped biases)."""
        return max([0.0, *(max(c.relative_error, c.bias_error) for c in self.layers)])

    def table(self) -> str:
        """The report as aligned text, one module a line."""
        width = max([6, *(len(c.name) for c in self.layers)])
        lines = [f"{'module':<{width}}  {'shape':>11}  {'delta rank':>10}  {'rank':>4}  {'rel. error':>10}"]
        for c in self.layers:
            line = f"{c.name:<{width}}  {f'{c.shape[0]}x{c.shape[1]}':>11}  {c.delta_rank:>10}  {c.rank:>4}  {c.relative_error:>10.3e}"
            lines.append(line + (f"  (bias dropped: {c.bias_error:.3e})" if c.bias_error else ""))
        if self.carried:
            lines.append(f"carried over unchanged: {', '.join(self.carried)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"source_peft_type": self.source_type, "r": self.config.r, "bias": self.config.bias,
                "max_relative_error": self.max_error, "carried": self.carried,
                "layers": [asdict(c) | {"shape": list(c.shape)} for c in self.layers]}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes a LoRA adapter folder (peftkit's and Hugging Face PEFT's format) with the
        report as ``conversion.json``; the folder is written beside and renamed into place."""
        from peftkit.core.io import WEIGHTS_NAME, atomic_write_folder, atomic_write_text, save_tensors

        def write(root: str) -> None:
            save_tensors(os.path.join(root, WEIGHTS_NAME), self.state_dict)
            config = copy.deepcopy(self.config)
            config.inference_mode = True
            config.save_pretrained(root)
            atomic_write_text(os.path.join(root, REPORT_NAME), json.dumps(self.to_json(), indent=2) + "\n")
            atomic_write_text(os.path.join(root, "README.md"), (
                f"---\nlibrary_name: peftkit\ntags:\n- peft\n- lora\n---\n\n# LoRA adapter (rank {self.config.r})\n\n"
                f"Converted from a {self.source_type} adapter by truncated SVD of its weight deltas; the largest "
                f"relative error over the modules is {self.max_error:.3e} ({REPORT_NAME} has each module's).\n"))

        atomic_write_folder(save_directory, write)

    def apply(self, model: nn.Module, adapter_name: str = "default", is_trainable: bool = False) -> Any:
        """``model`` (the plain base model, wrapped in place) with the converted LoRA: a ``PeftModel``."""
        from peftkit.peft_model import PeftModel

        return PeftModel.from_state(model, copy.deepcopy(self.config), dict(self.state_dict), adapter_name, is_trainable)


def _source(model_or_adapter: Any, adapter_name: str | None, base_model: nn.Module | None) -> tuple[nn.Module, Any, str]:
    """The module holding the adapter layers, the adapter's config and its name."""
    if isinstance(model_or_adapter, (str, os.PathLike)):
        if base_model is None:
            raise ConversionError(
                f"{os.fspath(model_or_adapter)!r} is an adapter folder: pass base_model= (the plain model it was "
                "trained on; it is wrapped in place) or load it with PeftModel.from_pretrained first"
            )
        from peftkit.peft_model import PeftModel

        model_or_adapter = PeftModel.from_pretrained(base_model, model_or_adapter)
    model = model_or_adapter
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and hasattr(model, "get_base_model"):
        root = model.get_base_model()
        if adapter_name is None and len(model.active_adapters) > 1:
            raise ConversionError(f"adapters {model.active_adapters} are active together; pass adapter_name= one of them")
        name = adapter_name or model.active_adapter
        if name in getattr(model, "model_adapters", {}):
            kind = type(configs[name]).peft_type
            raise ConversionError(
                f"{kind} adapters change what the model is fed (its inputs or attention cache), not its weights: "
                "they have no weight delta and cannot become a LoRA; train a LoRA instead"
            )
    else:
        root = model
        configs = getattr(model, "_peftkit_configs", None) or {}
        names = sorted({n for _, layer in adapter_layers(model) for n in layer.adapter_names})
        if adapter_name is None and len(names) != 1:
            raise ConversionError(f"the model holds adapters {names}; pass adapter_name= one of them")
        name = adapter_name or names[0]
    if name not in configs and not any(name in layer.adapter_names for _, layer in adapter_layers(root)):
        raise ConversionError(f"the model holds no adapter named {name!r}")
    return root, configs.get(name), name


def _matrix(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """The weight delta as the matrix LoRA factors: (out, in·kernel), or (dim, vocab)."""
    if isinstance(base, nn.Embedding) or is_transformers_conv1d(base):
        return delta.T
    return delta.reshape(delta.shape[0], -1)


def _factors(base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """``A`` (r × cols) and ``B`` (rows × r) under LoRA's keys and shapes for ``base``."""
    if isinstance(base, nn.Embedding):
        return {"lora_embedding_A": a, "lora_embedding_B": b}
    if isinstance(base, _CONV_TYPES):
        k = base.weight.dim() - 2
        a = a.reshape(a.shape[0], *base.weight.shape[1:])
        b = b.reshape(*b.shape, *([1] * k))
    return {"lora_A.weight": a, "lora_B.weight": b}


def _svd(m: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """A, B (``s·B·A`` the best rank-``rank`` part of ``m``), the relative error, the numerical rank."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    total = float(s.pow(2).sum())
    # the tail itself, not total − kept (which cancels where the error is tiny)
    error = float(s[rank:].pow(2).sum().sqrt()) / math.sqrt(total) if total > 0 else 0.0
    noise = float(s[0]) * max(m.shape) * torch.finfo(torch.float32).eps if len(s) else 0.0
    delta_rank = int((s > noise).sum()) if total > 0 else 0
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :], error, delta_rank


def convert_to_lora(
    model_or_adapter: Any,
    rank: int,
    lora_alpha: float | None = None,
    adapter_name: str | None = None,
    bias: str = "auto",
    base_model: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    pretrained: nn.Module | None = None,
) -> LoraConversion:
    """A LoRA of rank ``rank`` that approximates an adapter's weight changes.

    Args:
        model_or_adapter: a ``PeftModel``, a module with adapters injected, or an adapter
            folder (then ``base_model`` is needed). Nothing in it is changed.
        rank: the LoRA's rank; a module whose delta cannot have that rank (a layer
            narrower than it) gets its full rank (``rank_pattern``).
        lora_alpha: α of the LoRA; default: each module's rank, so the scaling α/r is 1.
        adapter_name: the adapter to convert; default: the active (or only) one.
        bias: ``"auto"``: biases the adapter changes are kept exactly (``bias="lora_only"``
            in the LoRA; the trained biases of the source are carried over); ``"none"``:
            dropped, their relative error reported (LoRA-only servers take no biases).
        base_model: the plain base model, when ``model_or_adapter`` is a folder.
        dtype: dtype of the LoRA factors.
        pretrained: the model before training, for an adapter that trained the model's own
            weights in place (full or layer-wise fine-tuning) without ``keep_original``;
            its deltas are the trained weights minus these. Modules LoRA cannot adapt whose
            weights changed (LayerNorm) are carried whole in ``modules_to_save``.

    Returns:
        A :class:`LoraConversion`: ``.config``, ``.state_dict``, ``.layers`` (the per-module
        report), ``.save_pretrained(folder)``, ``.apply(base_model)``.

    Raises:
        ConversionError: the adapter changes the model's inputs rather than its weights
            (prompt methods), cannot be merged (bottleneck), changes a module LoRA cannot
            adapt, or trains base parameters LoRA cannot carry.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConversionError(f"rank must be a positive integer, got {rank!r}")
    if bias not in ("auto", "none"):
        raise ConversionError(f"bias must be 'auto' (keep changed biases) or 'none' (drop them), got {bias!r}")
    root, source_config, name = _source(model_or_adapter, adapter_name, base_model)
    source_type = getattr(type(source_config), "peft_type", None) or "adapter"
    layers = [(n, layer) for n, layer in adapter_layers(root) if name in layer.adapter_names]
    if not layers:
        raise ConversionError(f"adapter {name!r} wraps no module of the model: there is no weight delta to convert")

    # Every refusal is found before any work: the adapter's kind, each layer, each module.
    refusals = []
    for n, layer in layers:
        if isinstance(layer, (InPlaceAdapter, ModulesToSaveWrapper)):
            continue
        if not is_mergeable(layer):
            refusals.append(f"{n}: {type(layer).__name__} ({source_type}) cannot be merged into the weights, so it has no "
                            "weight delta to approximate")
        elif not _convertible(layer.base_layer):
            refusals.append(f"{n}: the adapter changes a {type(layer.base_layer).__name__}, whose update is not one LoRA "
                            f"factor pair (conversion targets {CONVERTIBLE})")
        elif layer.merged_adapters:
            refusals.append(f"{n}: adapters are merged into the weights; call unmerge_adapter() before converting")
    if refusals:
        raise ConversionError(f"cannot convert the {source_type} adapter {name!r} to LoRA:\n  " + "\n  ".join(dict.fromkeys(refusals)))

    trained_base = adapter_base_parameter_names(root, name) if not any(isinstance(x, InPlaceAdapter) for _, x in layers) else []
    source_bias = getattr(source_config, "bias", "none") if trained_base else "none"
    if trained_base and not (source_bias in ("all", "lora_only") and all(p.endswith("bias") for p in trained_base)):
        raise ConversionError(f"the adapter trains base parameters {trained_base[:3]} that a LoRA cannot carry")
    if trained_base and bias == "none":
        raise ConversionError(f"the adapter trains biases (bias={source_bias!r}); convert with bias='auto' to keep them")

    state: dict[str, torch.Tensor] = {}
    carried: list[str] = []
    # (module name, the module the LoRA wraps, {parameter: W' − W₀}, its bias before the adapter)
    items: list[tuple[str, nn.Module, dict[str, torch.Tensor], torch.Tensor | None]] = []
    for n, layer in layers:
        if isinstance(layer, ModulesToSaveWrapper):
            carried.append(n)
            state.update({f"{PREFIX}{n}.{k}": v.detach().to("cpu", copy=True) for k, v in layer.adapter_state_dict(name).items()})
        elif isinstance(layer, InPlaceAdapter):
            items.extend(_in_place_items(root, layer, pretrained, state, carried, source_type))
        else:
            try:
                deltas = weight_delta(layer, name, n)
            except NotMergeableError as exc:
                raise ConversionError(f"cannot convert the {source_type} adapter {name!r} to LoRA: {exc}") from None
            items.append((n, layer.base_layer, deltas, getattr(layer.base_layer, "bias", None)))

    report: list[LayerConversion] = []
    ranks: dict[str, int] = {}
    bias0: dict[str, torch.Tensor] = {}
    changed_bias = False
    kinds: set[str] = set()
    for n, base, deltas, own_bias in items:
        other = sorted(set(deltas) - {"weight", "bias"})
        if other:
            raise ConversionError(f"{n}: the adapter changes {other} of the {type(base).__name__}, which a LoRA cannot carry")
        r = min(rank, full_rank(base))
        ranks[n] = r
        alpha = float(r if lora_alpha is None else lora_alpha)
        delta = deltas.get("weight", torch.zeros(base.weight.shape, dtype=torch.float64))
        a, b, error, delta_rank = _svd(_matrix(base, delta.cpu()), r, alpha / r)
        state.update({f"{PREFIX}{n}.{k}": v.to(dtype).contiguous() for k, v in _factors(base, a, b).items()})
        bias_error = 0.0
        if isinstance(own_bias, torch.Tensor):
            bias0[n] = own_bias.detach().to("cpu", copy=True)
        if "bias" in deltas:
            new_bias = own_bias.detach().cpu().double() + deltas["bias"].cpu()
            if bias == "auto":
                changed_bias = True
                state[f"{PREFIX}{n}.base_layer.bias"] = new_bias.to(own_bias.dtype)
            else:
                bias_error = float(deltas["bias"].norm() / new_bias.norm()) if new_bias.norm() > 0 else 0.0
        kinds.add("conv1d" if is_transformers_conv1d(base) else "linear" if isinstance(base, nn.Linear) else "other")
        report.append(LayerConversion(n, tuple(_matrix(base, delta).shape), r, delta_rank, error, bias_error))
    if not items:
        raise ConversionError(f"the {source_type} adapter {name!r} changes no weight a LoRA could carry")

    if trained_base:  # the source's own trained biases, as they are
        params = dict(root.named_parameters())
        state.update({PREFIX + p: params[p].detach().to("cpu", copy=True) for p in trained_base if p in params})
    out_bias = source_bias if trained_base else ("lora_only" if changed_bias else "none")
    if out_bias == "lora_only":  # such a LoRA stores the bias of every layer it wraps that has one
        for n, own in bias0.items():
            state.setdefault(f"{PREFIX}{n}.base_layer.bias", own)
    alpha = float(rank if lora_alpha is None else lora_alpha)
    narrow = {n: r for n, r in ranks.items() if r != rank}
    # Readers detect GPT-2's Conv1D by themselves; the flag is written where it holds for every
    # module (peftkit refuses it on an nn.Linear, Hugging Face PEFT corrects it either way).
    fan_in_fan_out = "conv1d" in kinds and "linear" not in kinds
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(ranks), rank_pattern=narrow,
        alpha_pattern={n: float(r) for n, r in narrow.items()} if lora_alpha is None else {},
        bias=out_bias, fan_in_fan_out=fan_in_fan_out, modules_to_save=_modules_to_save(source_config, carried),
        task_type=getattr(source_config, "task_type", None),
        base_model_name_or_path=getattr(source_config, "base_model_name_or_path", None),
    )
    for n, base, _, _ in items:
        check_lora_target(base, config, n)
    return LoraConversion(config, state, report, source_type, carried)


def _in_place_items(root: nn.Module, layer: InPlaceAdapter, pretrained: nn.Module | None, state: dict[str, torch.Tensor],
                    carried: list[str], source_type: str) -> list[tuple[str, nn.Module, dict[str, torch.Tensor], torch.Tensor | None]]:
    """The modules whose own parameters an in-place adapter trained, with their deltas (for
    LoRA), or carried whole into ``state`` / ``carried`` (modules LoRA cannot adapt). A
    parameter shared by several modules (tied embeddings and output layer) gives each of them
    its delta."""
    trained_now = bool(layer.merged_adapters)
    current = dict(root.named_parameters())
    if layer._elsewhere is not None:
        other = layer._elsewhere  # the values not in the model: the originals while merged
        originals = other if trained_now else {n: current[n] for n in layer.parameter_names}
        trained = {n: current[n] for n in layer.parameter_names} if trained_now else other
    elif pretrained is not None:
        before = dict(pretrained.named_parameters())
        missing = [n for n in layer.parameter_names if n not in before]
        if missing:
            raise ConversionError(f"pretrained= has no parameters {missing[:3]}: pass the model the run started from")
        originals, trained = before, {n: current[n] for n in layer.parameter_names}
    else:
        raise ConversionError(
            f"the {source_type} adapter trained the model's weights in place and kept no copy of the originals: pass "
            "pretrained= (the model before training), or train with keep_original=True"
        )
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in root.named_modules(remove_duplicate=False):
        for leaf, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, leaf))
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    originals_of: dict[str, dict[str, torch.Tensor]] = {}
    for pname in layer.parameter_names:
        delta = trained[pname].detach().cpu().double() - originals[pname].detach().cpu().double()
        if not bool(delta.any()):
            continue
        for mname, leaf in owners.get(id(current[pname]), []):
            per_module.setdefault(mname, {})[leaf] = delta
            originals_of.setdefault(mname, {})[leaf] = originals[pname].detach()
    out = []
    for mname, deltas in per_module.items():
        module = root.get_submodule(mname) if mname else root
        if mname and _convertible(module) and set(deltas) <= {"weight", "bias"}:
            out.append((mname, module, deltas, originals_of[mname].get("bias", getattr(module, "bias", None))))
        elif mname and not isinstance(module, InPlaceAdapter):
            carried.append(mname)
            state.update({f"{PREFIX}{mname}.{k}": trained.get(f"{mname}.{k}", p).detach().to("cpu", copy=True)
                          for k, p in module.named_parameters()})
        else:
            raise ConversionError(f"the adapter changes parameters {sorted(deltas)} of the model itself, which a LoRA cannot carry")
    return out


def _modules_to_save(source_config: Any, carried: list[str]) -> list[str] | None:
    """The source's own ``modules_to_save`` names where they cover the carried modules, else the full paths."""
    names = list(getattr(source_config, "modules_to_save", None) or [])
    if all(any(c == m or c.endswith("." + m) for m in names) for c in carried):
        return names or None
    return carried
