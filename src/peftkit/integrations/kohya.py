"""kohya / A1111 LoRA files: the layout of the Stable Diffusion community's LoRA files.

What sd-scripts writes and AUTOMATIC1111's web UI, ComfyUI and diffusers'
``load_lora_weights`` read is one safetensors file with, per adapted module:

- ``<prefix><module path, dots as underscores>.lora_down.weight``: A, (r, in) for a linear
  layer, (r, in, kh, kw) for a convolution;
- ``....lora_up.weight``: B, (out, r) or (out, r, 1, 1);
- ``....alpha``: a scalar α; the update is ``(α/r)·B·A`` (without it α = r, scale 1).

peftkit reads α per module, as sd-scripts defines it. diffusers' loader (0.42) does not
quite: an α that differs from the component's most common one is dropped on attention
projections and anywhere in a text encoder, modules without an α get that common α rather
than their rank, and a text encoder's entries are misread unless one is an ``out_proj``. So
peftkit writes files every reader takes the same way: one α per component (a module whose
own α differs has the ratio folded into its factors), and, where a text encoder's LoRA has
no ``out_proj``, a rank-1 LoRA of zeros on one (it changes nothing; read back, it is an
extra, zero module).

The prefix names the component: ``lora_unet_`` the UNet, ``lora_te_`` the text encoder of
Stable Diffusion 1.x/2.x, ``lora_te1_`` / ``lora_te2_`` the two text encoders of SDXL.
UNet paths are diffusers' module paths (``lora_unet_down_blocks_0_attentions_0_transformer_
blocks_0_attn1_to_q``); text-encoder paths are those of transformers' ``CLIPTextModel``
with its ``text_model`` level (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``),
which transformers 5 no longer has and which is added or removed here to fit.

Underscores make a path ambiguous (``to_out_0`` is ``to_out.0``), so a file is read
against the modules it is loaded into: each module's path, written with underscores, is
looked up. sd-scripts' SDXL files name the blocks of the original (LDM) SDXL UNet
(``input_blocks_4_1_...``); they are not mapped and are refused with the key named.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import torch
from torch import nn

from peftkit.core.io import save_tensors
from peftkit.integrations.diffusers import (
    DiffusersLoraError,
    _file_of,
    _lora_layers,
    _root_and_config,
    _scaling_kind,
    _settings,
    diffusers_lora_state_dict,
)

__all__ = [
    "KOHYA_PREFIXES",
    "KOHYA_WEIGHT_NAME",
    "is_kohya_state_dict",
    "kohya_lora_state_dict",
    "load_kohya_lora_weights",
    "read_kohya_lora_weights",
    "save_kohya_lora_weights",
]

KOHYA_WEIGHT_NAME = "lora.safetensors"
# component -> key prefix (SD 1.x/2.x); with text_encoder_2 the first text encoder is lora_te1_.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_READ_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"))
_SUFFIXES = {".lora_down.weight": "lora_A.weight", ".lora_up.weight": "lora_B.weight", ".alpha": "alpha"}
_TEXT_MODEL = "text_model."


def is_kohya_state_dict(keys: Any) -> bool:
    """Whether tensor keys follow the kohya layout (``lora_unet_...``, ``lora_te_...``)."""
    return any(str(k).startswith(tuple(p for p, _ in _READ_PREFIXES)) for k in keys)


# -- writing ------------------------------------------------------------------------------


def _text_model_names(module: nn.Module) -> bool:
    """Whether the module's paths have the ``text_model`` level (transformers < 5 CLIP)."""
    return any(n == "text_model" or n.startswith(_TEXT_MODEL) for n, _ in module.named_modules())


def kohya_lora_state_dict(model: nn.Module, prefix: str, adapter_name: str = "default", text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """One component's LoRA tensors under kohya keys.

    Args:
        model: a peftkit ``PeftModel`` or a module holding peftkit LoRA layers.
        prefix: the component's key prefix (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``).
        adapter_name: the adapter to take.
        text_encoder: paths get the ``text_model`` level kohya files name.

    Raises:
        DiffusersLoraError: an adapter the format cannot carry (DoRA, embeddings, biases,
            fully trained modules).
    """
    tensors, settings = diffusers_lora_state_dict(model, adapter_name)  # also refuses what no LoRA file can hold
    if settings["use_dora"]:
        raise DiffusersLoraError("kohya LoRA files written by peftkit hold plain LoRA, not DoRA; save with save_lora_weights")
    root, _ = _root_and_config(model, adapter_name)
    add_text_model = text_encoder and not _text_model_names(root)
    layers = _lora_layers(root, adapter_name)
    for name, layer in layers.items():
        _scaling_kind(name, layer, adapter_name)  # refuses a scaling changed after training
    # The file's α/r with α = s·r is the layer's own scaling s (rank-stabilised α/√r too).
    alphas = {name: layer.scaling[adapter_name] * layer.r[adapter_name] for name, layer in layers.items()}
    # Every module gets one α: diffusers' kohya loader keeps a module's own α only where it is
    # the file's most common one for attention projections (0.42 drops the others). A module
    # whose α differs has the ratio folded into its factors, √c into each, so s·B·A is unchanged.
    common = collections.Counter(alphas.values()).most_common(1)[0][0]
    out: dict[str, torch.Tensor] = {}
    for name in layers:
        path = (_TEXT_MODEL + name if add_text_model else name).replace(".", "_")
        a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        if alphas[name] != common:
            root_c = math.sqrt(alphas[name] / common)
            a, b = a * root_c, b * root_c
        out[f"{prefix}{path}.lora_down.weight"] = a.contiguous()
        out[f"{prefix}{path}.lora_up.weight"] = b.contiguous()
        out[f"{prefix}{path}.alpha"] = torch.tensor(float(common), dtype=torch.float32)
    if text_encoder:
        _add_out_proj_marker(root, out, prefix, common, add_text_model)
    return out


def _add_out_proj_marker(root: nn.Module, out: dict[str, torch.Tensor], prefix: str, alpha: float, add_text_model: bool) -> None:
    """diffusers (0.42) tells the kind of a text encoder's converted keys by an ``out_proj``
    entry: a file whose attention LoRA lacks one fails to load there ("could not infer state
    dict type") or loads its MLP entries wrongly. Such a file gets a rank-1 LoRA of zeros on
    one attention's ``out_proj``: it changes nothing, and diffusers reads the file right."""
    attention = [k for k in out if k.endswith(("q_proj.lora_down.weight", "k_proj.lora_down.weight", "v_proj.lora_down.weight"))]
    if not attention or any("out_proj." in k for k in out):
        return
    module_path = attention[0][len(prefix): -len("q_proj.lora_down.weight")] + "out_proj"
    name = next((n for n, _ in root.named_modules() if ((_TEXT_MODEL + n) if add_text_model else n).replace(".", "_") == module_path), None)
    module = root.get_submodule(name) if name else None
    if not isinstance(module, nn.Linear):
        return
    dtype = out[attention[0]].dtype
    out[f"{prefix}{module_path}.lora_down.weight"] = torch.zeros(1, module.in_features, dtype=dtype)
    out[f"{prefix}{module_path}.lora_up.weight"] = torch.zeros(module.out_features, 1, dtype=dtype)
    out[f"{prefix}{module_path}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)


def save_kohya_lora_weights(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
) -> str:
    """Writes the LoRA adapters of a pipeline's components as one kohya-format file.

    Args:
        path: the ``.safetensors`` file to write, or a folder (then ``lora.safetensors`` in it).
        unet, text_encoder, text_encoder_2: each a peftkit ``PeftModel`` or a module holding
            peftkit LoRA layers; components left None are not written. With
            ``text_encoder_2`` (SDXL) the first text encoder's keys are ``lora_te1_``.
        adapter_name: the adapter to export.

    Returns:
        The path of the file written (atomically).
    """
    prefixes = dict(KOHYA_PREFIXES)
    if text_encoder_2 is not None:
        prefixes["text_encoder"] = "lora_te1_"
    tensors: dict[str, torch.Tensor] = {}
    for component, module in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if module is not None:
            tensors.update(kohya_lora_state_dict(module, prefixes[component], adapter_name, text_encoder=component != "unet"))
    if not tensors:
        raise DiffusersLoraError("save_kohya_lora_weights needs at least one of unet, text_encoder, text_encoder_2")
    file = os.fspath(path)
    if os.path.isdir(file) or not file.endswith(".safetensors"):
        os.makedirs(file, exist_ok=True)
        file = os.path.join(file, KOHYA_WEIGHT_NAME)
    save_tensors(file, tensors, metadata={"format": "pt"})
    return file


# -- reading ------------------------------------------------------------------------------


def _split(key: str) -> tuple[str, str, str, str]:
    """``(component, prefix, flat module path, peftkit tensor name)`` of a kohya key."""
    for prefix, component in _READ_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for suffix, kind in _SUFFIXES.items():
                if rest.endswith(suffix):
                    return component, prefix, rest[: -len(suffix)], kind
            tail = rest.split(".", 1)[1] if "." in rest else rest
            raise DiffusersLoraError(
                f"{key}: '{tail}' is not a LoRA tensor (lora_down.weight, lora_up.weight, alpha); LyCORIS (LoHa, LoKr), "
                "DoRA (dora_scale) and full-weight (diff) entries are not read by peftkit's kohya reader"
            )
    raise DiffusersLoraError(f"{key}: not a kohya LoRA key (lora_unet_..., lora_te_..., lora_te1_..., lora_te2_...)")


def _module_index(module: nn.Module, text_encoder: bool) -> dict[str, str]:
    """``{path with underscores: path}`` of the module's submodules; for a text encoder also
    with the ``text_model`` level added or removed, as files name it either way."""
    index: dict[str, str] = {}
    for name, _ in module.named_modules():
        if not name:
            continue
        index[name.replace(".", "_")] = name
        if text_encoder:
            other = name[len(_TEXT_MODEL):] if name.startswith(_TEXT_MODEL) else _TEXT_MODEL + name
            index.setdefault(other.replace(".", "_"), name)
    return index


def read_kohya_lora_weights(
    path: str | os.PathLike, components: dict[str, nn.Module], weight_name: str | None = None
) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """The LoRA adapters of a kohya file, resolved against the given components.

    Args:
        path: the file, or a folder holding it (``weight_name``, else its one ``.safetensors`` file).
        components: ``{"unet": module, "text_encoder": module, ...}`` the file is for.
        weight_name: the file name inside a folder.

    Returns:
        ``{component: (LoraConfig, tensors keyed base_model.model.<module path>.lora_A.weight)}``.

    Raises:
        DiffusersLoraError: keys of another kind, a component the file adapts but that was not
            given, a module path that none of the component's modules has, a missing factor.
    """
    from safetensors import safe_open

    from peftkit.methods.lora.config import LoraConfig

    file = _kohya_file(path, weight_name)
    with safe_open(file, framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    parsed: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        component, prefix, flat, kind = _split(key)
        parsed.setdefault(component, {}).setdefault(flat, {})[kind] = tensor
        parsed[component][flat]["_prefix"] = prefix  # type: ignore[assignment]
    missing = [c for c in parsed if components.get(c) is None]
    if missing:
        raise DiffusersLoraError(f"{file} holds LoRA tensors for {missing}; pass those components too")
    out = {}
    for component, modules in parsed.items():
        root = components[component]
        index = _module_index(root, text_encoder=component != "unet")
        state: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for flat, entry in modules.items():
            prefix = entry.pop("_prefix")
            name = index.get(flat)
            if name is None:
                raise DiffusersLoraError(
                    f"{prefix}{flat}: the {component} ({type(root).__name__}) has no module of that path"
                    + ("; sd-scripts' SDXL files name the original (LDM) UNet's blocks (input_blocks_...), which are not "
                       "mapped" if any(b in flat for b in ("input_blocks", "middle_block", "output_blocks")) else
                       "; the file was made for another model")
                )
            if "lora_A.weight" not in entry or "lora_B.weight" not in entry:
                raise DiffusersLoraError(f"{prefix}{flat}: the file lacks its lora_down or lora_up weight")
            for kind in ("lora_A.weight", "lora_B.weight"):
                state[f"base_model.model.{name}.{kind}"] = entry[kind]
            ranks[name] = int(entry["lora_A.weight"].shape[0])
            alphas[name] = float(entry["alpha"].item()) if "alpha" in entry else float(ranks[name])
        out[component] = (LoraConfig(**_settings(ranks, alphas)), state)
    return out


def _kohya_file(path: str | os.PathLike, weight_name: str | None) -> str:
    path = os.fspath(path)
    if os.path.isdir(path) and not weight_name:
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) == 1:
            return os.path.join(path, found[0])
        if not found:
            raise FileNotFoundError(f"no .safetensors file in {path!r}")
        raise FileNotFoundError(f"{path!r} holds several .safetensors files {found}; pass weight_name=")
    return _file_of(path, weight_name)


def load_kohya_lora_weights(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    weight_name: str | None = None,
) -> dict[str, Any]:
    """Wraps the given components with the LoRA adapters of a kohya / A1111 file.

    Args:
        path: the file, or a folder holding it.
        unet, text_encoder, text_encoder_2: the plain (not yet wrapped) components; those the
            file has tensors for are wrapped, the others are left alone.
        adapter_name: the adapter's name in the returned models.
        is_trainable: keep the adapters trainable (else frozen, the models in eval mode).
        weight_name: the file name inside a folder.

    Returns:
        ``{component: PeftModel}`` for every component the file adapts.
    """
    from peftkit.peft_model import PeftModel

    given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    adapters = read_kohya_lora_weights(path, {k: v for k, v in given.items() if v is not None}, weight_name)
    out: dict[str, Any] = {}
    for component, (config, state) in adapters.items():
        try:
            out[component] = PeftModel.from_state(given[component], config, state, adapter_name, is_trainable)
        except Exception:
            for done in out.values():  # the components wrapped before this one
                done.unload()
            raise
    return out
