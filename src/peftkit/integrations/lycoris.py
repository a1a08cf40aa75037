"""LyCORIS LoHa / LoKr files (the diffusion community's format) read into peftkit's LoHa and LoKr.

A LyCORIS file names each adapted module as kohya does: a prefix for the component
(``lora_unet`` for a Stable Diffusion UNet, ``lora_te`` for its text encoder, ``lora_te1`` /
``lora_te2`` for SDXL's two) and the module's path with dots turned into underscores
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``). Each module has its
factors under the same suffixes peftkit's layers use, and a scalar ``.alpha``:

- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and ``hada_t1``/``hada_t2``
  for Tucker-factored kernels); ``ΔW = (alpha/r)·(W1a·W1b) ⊙ (W2a·W2b)`` with
  r = ``hada_w1_b.shape[0]``.
- LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``
  (and ``lokr_t2``); ``ΔW = s·W1 ⊗ W2`` with ``s = alpha/r`` when a factor is stored as a
  rank-r product (r its inner size), and ``s = 1`` when both are full matrices.

:func:`save_lycoris` writes a peftkit LoHa or LoKr adapter in this layout (a LoKr whose factors
are both full has its scale folded into ``lokr_w1``, since readers apply none then).

:func:`load_lycoris` builds the matching :class:`~peftkit.LoHaConfig` / :class:`~peftkit.LoKrConfig`
(the adapted modules, their ranks and alphas) and loads the tensors, so the result is an
ordinary peftkit adapter: merged, unloaded, saved in Hugging Face PEFT's format.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch
from torch import nn

__all__ = ["LycorisError", "kohya_name", "load_lycoris", "lycoris_state_dict", "read_lycoris", "save_lycoris"]

LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: the component prefixes of Stable Diffusion files: UNet, text encoder, SDXL's two encoders
PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te")


class LycorisError(ValueError):
    """A LyCORIS file that cannot be read into the given model."""


def kohya_name(prefix: str, module_name: str) -> str:
    """``prefix + "_" + module_name`` with dots as underscores (kohya / LyCORIS module names)."""
    return f"{prefix}_{module_name.replace('.', '_')}"


def read_lycoris(source: str | os.PathLike | dict[str, torch.Tensor]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{component prefix: {module key: {suffix: tensor}}}`` of a LyCORIS file (or state dict).

    Raises:
        LycorisError: a key outside the known prefixes, or a suffix that is neither LoHa's nor
            LoKr's (a plain kohya LoRA's ``lora_down``, say), naming the key.
    """
    if isinstance(source, dict):
        state = source
    else:
        from safetensors.torch import load_file

        state = load_file(os.fspath(source))
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    known = (*LOHA_SUFFIXES, *LOKR_SUFFIXES, "alpha")
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".")
        prefix = next((p for p in PREFIXES if module.startswith(p + "_")), None)
        if prefix is None:
            raise LycorisError(f"{key!r}: not a LyCORIS module key; they start with one of {', '.join(PREFIXES)}")
        if suffix not in known:
            hint = " (a kohya LoRA file: read it as LoRA)" if ".lora_down" in key or ".lora_up" in key else ""
            raise LycorisError(f"{key!r}: suffix {suffix!r} is neither LoHa's nor LoKr's{hint}; "
                               f"known suffixes: {', '.join(known)}")
        out.setdefault(prefix, {}).setdefault(module, {})[suffix] = tensor
    return out


def _kind(module_key: str, tensors: dict[str, torch.Tensor]) -> str:
    if "hada_w1_a" in tensors:
        return "LOHA"
    if "lokr_w1" in tensors or "lokr_w1_a" in tensors:
        return "LOKR"
    raise LycorisError(f"{module_key}: holds {sorted(tensors)}, neither a LoHa (hada_w1_a ...) nor a LoKr (lokr_w1 ...) module")


def _alpha(tensors: dict[str, torch.Tensor], default: float) -> float:
    alpha = tensors.get("alpha")
    return default if alpha is None else float(alpha.float().reshape(-1)[0])


def _loha_entry(tensors: dict[str, torch.Tensor]) -> tuple[int, float, bool]:
    r = int(tensors["hada_w1_b"].shape[0])
    return r, _alpha(tensors, r), "hada_t1" in tensors


def _lokr_entry(module_key: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[int, float, int]:
    """``(r, alpha, decompose_factor)`` that make peftkit's LoKr layer hold the file's shapes
    with the file's scale."""
    from peftkit.methods.lokr.layer import factorize

    w1 = tensors.get("lokr_w1")
    a, c = (tuple(w1.shape) if w1 is not None else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]))
    out_dim, in_dim = weight.shape[0], weight.shape[1]
    factor = next((f for f in (-1, a) if factorize(out_dim, f)[0] == a and factorize(in_dim, f)[0] == c), None)
    if factor is None:
        raise LycorisError(f"{module_key}: lokr_w1 is {a} × {c}, which no split of the weight {tuple(weight.shape)} "
                           "into Kronecker factors near its square root (or near a given factor) gives")
    b, d = out_dim // a, in_dim // c
    factored = "lokr_w2_b" if "lokr_w2_b" in tensors else "lokr_w1_b" if "lokr_w1_b" in tensors else None
    if factored is None:  # both factors full: no alpha scaling
        r = max(a, b, c, d)
        return r, float(r), factor
    r = int(tensors[factored].shape[0])
    return r, _alpha(tensors, r), factor


def _module_keys(model: nn.Module, prefix: str) -> dict[str, str]:
    """``{file module key: module name}``. CLIP text encoders of transformers 5 have no
    ``text_model`` level, which files written for older versions name: both spellings are read."""
    names = [n for n, _ in model.named_modules() if n]
    keys = {kohya_name(prefix, n): n for n in names}
    if "text_model" not in names and "encoder" in names:
        keys |= {kohya_name(prefix, "text_model." + n): n for n in names}
    return keys


def load_lycoris(model: nn.Module, source: str | os.PathLike | dict[str, torch.Tensor], prefix: str = "lora_unet",
                 adapter_name: str = "default") -> Any:
    """Wraps ``model`` (a UNet, a text encoder, any module) with the LoHa or LoKr adapter that the
    LyCORIS file's ``prefix`` component holds; returns the ``PeftModel``.

    Module names, kinds and options are checked before the model is changed; a tensor whose
    shape does not fit is found while loading, and the model is then unwrapped again, as it was.

    Raises:
        LycorisError: no module of the file under ``prefix``, a module name the model lacks
            (with the closest ones), LoHa and LoKr modules mixed in one component, or shapes
            that do not fit (naming the key and both shapes).
    """
    from peftkit.core.state import AdapterStateError, set_peft_model_state_dict
    from peftkit.methods.loha import LoHaConfig
    from peftkit.methods.lokr import LoKrConfig
    from peftkit.peft_model import get_peft_model

    components = read_lycoris(source)
    if prefix not in components:
        raise LycorisError(f"the file holds no {prefix}_* modules; it holds {sorted(components) or 'nothing'}")
    modules = components[prefix]
    names = _module_keys(model, prefix)
    missing = [k for k in modules if k not in names]
    if missing:
        close = difflib.get_close_matches(missing[0], list(names), n=3)
        raise LycorisError(f"{missing[0]}: the model has no such module" + (f" (closest: {close})" if close else "")
                           + f"; {len(missing)} of the file's {len(modules)} modules are missing: is it for another model?")
    kinds = {_kind(k, t) for k, t in modules.items()}
    if len(kinds) > 1:
        raise LycorisError(f"the {prefix} component mixes LoHa and LoKr modules; a model holds adapters of one method")
    kind = kinds.pop()
    targets = sorted(names[k] for k in modules)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    extra: dict[str, Any] = {}
    for key, tensors in modules.items():
        name = names[key]
        weight = model.get_submodule(name).weight
        # Tucker-factored kernels exist only on convolutions with kernels above 1 × 1
        kernel = weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)
        if kind == "LOHA":
            r, alpha, tucker = _loha_entry(tensors)
        else:
            r, alpha, factor = _lokr_entry(key, tensors, weight)
            tucker = "lokr_t2" in tensors
            kernel = kernel and "lokr_w2" not in tensors  # a full W2 carries its kernel either way
            extra.setdefault("decompose_factor", set()).add(factor)
            extra.setdefault("decompose_both", set()).add("lokr_w1_a" in tensors)
        if kernel:
            extra.setdefault("use_effective_conv2d", set()).add(tucker)
        rank_pattern[name] = r
        alpha_pattern[name] = alpha
    options = {}
    for option, values in extra.items():
        if len(values) > 1 and option != "decompose_both":
            raise LycorisError(f"the {prefix} modules differ in {option} ({sorted(values)}); peftkit sets it per adapter")
        # decompose_both only allows factoring W1 where the rank is small enough: any module with it factored sets it
        options[option] = max(values) if option == "decompose_both" else values.pop()
    config_cls = LoHaConfig if kind == "LOHA" else LoKrConfig
    config = config_cls(target_modules=targets, r=max(rank_pattern.values()), rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, **options)
    state = {f"base_model.model.{names[k]}.{s}": t for k, tensors in modules.items() for s, t in tensors.items() if s != "alpha"}
    wrapped = get_peft_model(model, config, adapter_name)
    try:
        set_peft_model_state_dict(wrapped, state, adapter_name)
    except AdapterStateError as exc:
        wrapped.unload()
        raise LycorisError(f"{exc} (read from a LyCORIS {kind} file)") from exc
    return wrapped


def _file_module_name(model: nn.Module, prefix: str, name: str) -> str:
    """The module path a kohya file names: CLIP text encoders under ``text_model.``, which
    transformers 5 no longer has."""
    names = {n for n, _ in model.named_modules()}
    if prefix.startswith("lora_te") and "text_model" not in names and "encoder" in names:
        return "text_model." + name
    return name


@torch.no_grad()
def lycoris_state_dict(model: nn.Module, prefix: str = "lora_unet", adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoHa or LoKr adapter ``adapter_name`` of ``model`` (a ``PeftModel`` or a model with
    the layers) as LyCORIS keys under ``prefix``.

    Raises:
        LycorisError: when the model holds no LoHa or LoKr layer with that adapter.
    """
    from peftkit.core.layer import adapter_layers
    from peftkit.methods.loha.layer import LoHaLayer
    from peftkit.methods.lokr.layer import LoKrLayer

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(inner):
        if not isinstance(layer, (LoHaLayer, LoKrLayer)) or adapter_name not in layer.r:
            continue
        key = kohya_name(prefix, _file_module_name(inner, prefix, name))
        tensors = {k: v.detach().clone() for k, v in layer.adapter_state_dict(adapter_name).items()}
        scale = layer.scaling[adapter_name] * layer.strength.get(adapter_name, 1.0)
        if isinstance(layer, LoHaLayer):
            rank = tensors["hada_w1_b"].shape[0]
        else:
            rank = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else (
                tensors["lokr_w1_b"].shape[0] if "lokr_w1_b" in tensors else None)
            if rank is None:  # both factors full: readers apply no scale, so it goes into W1
                tensors["lokr_w1"] = tensors["lokr_w1"] * scale
                rank, scale = 1, 1.0
        out |= {f"{key}.{suffix}": t for suffix, t in tensors.items()}
        out[f"{key}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    if not out:
        raise LycorisError(f"the model holds no LoHa or LoKr adapter named {adapter_name!r} to write in LyCORIS's layout")
    return out


def save_lycoris(model: nn.Module, path: str | os.PathLike, prefix: str = "lora_unet", adapter_name: str = "default") -> None:
    """Writes :func:`lycoris_state_dict` to a safetensors file (atomically)."""
    from peftkit.core.io import save_tensors

    save_tensors(path, lycoris_state_dict(model, prefix, adapter_name))
