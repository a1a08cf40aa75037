"""LoRA files for diffusers pipelines (Stable Diffusion and its relatives).

diffusers' ``pipeline.load_lora_weights(folder)`` reads one safetensors file,
``pytorch_lora_weights.safetensors``, holding every component's LoRA tensors:

- keys are ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (Hugging Face
  PEFT's names), where the component is ``unet``, ``text_encoder`` or ``text_encoder_2``
  and the module path is relative to that component (``unet.down_blocks.0.attentions.0.
  transformer_blocks.0.attn1.to_q.lora_A.weight``);
- the file's metadata entry ``lora_adapter_metadata`` is a JSON object of LoRA settings
  keyed ``<component>.<field>`` (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``,
  ...). With it the loader rebuilds the exact scaling α/r of every module; without it,
  diffusers assumes α = r (scale 1) unless the file carries ``<module>.alpha`` tensors.

:func:`save_lora_weights` writes such a file from peftkit LoRA adapters, with the
metadata, so a pipeline that loads it computes what the peftkit model computes.
:func:`load_lora_weights` reads such a file (written by peftkit, diffusers or PEFT) into
peftkit models; it also takes kohya / A1111 files (``lora_unet_...`` keys), which
:mod:`peftkit.integrations.kohya` reads and writes. Nothing here imports diffusers.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any

import torch
from torch import nn

from peftkit.core.io import save_tensors
from peftkit.core.layer import adapter_layers

__all__ = [
    "COMPONENTS",
    "LORA_WEIGHT_NAME",
    "DiffusersLoraError",
    "diffusers_lora_state_dict",
    "load_lora_weights",
    "read_lora_weights",
    "save_lora_weights",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Names of the two LoRA factors in files of older diffusers versions -> PEFT's names.
_FACTOR_ALIASES = {
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
}
# The oldest diffusers files name the attention processor: `attn1.processor.to_q_lora.down.weight`.
_PROCESSOR_ALIASES = {f".processor.{p}_lora.": f".{m}.lora." for p, m in
                      (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0"))}
# LoRA settings the metadata carries that peftkit's LoraConfig reads.
_CONFIG_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


class DiffusersLoraError(ValueError):
    """A model or file that cannot be written or read as a diffusers LoRA file."""


# -- writing ------------------------------------------------------------------------------


def _root_and_config(model: nn.Module, adapter_name: str) -> tuple[nn.Module, Any]:
    """The module holding the LoRA layers, and the adapter's config when ``model`` is a
    PeftModel (None for a plain module)."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and hasattr(model, "get_base_model"):
        return model.get_base_model(), configs.get(adapter_name)
    return model, (getattr(model, "_peftkit_configs", None) or {}).get(adapter_name)


def _lora_layers(root: nn.Module, adapter_name: str) -> dict[str, Any]:
    from peftkit.methods.lora.layer import LoraLayer

    return {name: layer for name, layer in adapter_layers(root) if isinstance(layer, LoraLayer) and adapter_name in layer.r}


def _scaling_kind(name: str, layer: Any, adapter_name: str) -> bool:
    """True when the layer scales by α/√r (rank-stabilised), False for α/r."""
    r, alpha, scaling = layer.r[adapter_name], layer.lora_alpha[adapter_name], layer.scaling[adapter_name]
    if scaling == alpha / r:
        return False
    if scaling == alpha / math.sqrt(r):
        return True
    raise DiffusersLoraError(
        f"{name}: the adapter's scaling {scaling} is neither α/r nor α/√r (α={alpha}, r={r}); it was changed "
        "after training (scale_adapter); restore the trained scaling before exporting"
    )


def diffusers_lora_state_dict(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One component's LoRA tensors keyed by module path (``down_blocks.0...to_q.lora_A.weight``)
    and the LoRA settings diffusers needs to rebuild it (PEFT ``LoraConfig`` fields).

    Args:
        model: a peftkit ``PeftModel`` or a module holding peftkit LoRA layers.
        adapter_name: the adapter to take.

    Raises:
        DiffusersLoraError: the model holds no LoRA adapter of that name, or one a diffusers
            pipeline cannot rebuild (trained biases, fully trained modules, a changed scaling).
    """
    root, config = _root_and_config(model, adapter_name)
    if config is not None:
        if getattr(config, "peft_type", "LORA") != "LORA":
            raise DiffusersLoraError(f"diffusers LoRA files hold LoRA adapters only, not {config.peft_type}")
        if getattr(config, "bias", "none") != "none":
            raise DiffusersLoraError(f"bias={config.bias!r}: diffusers LoRA files cannot carry trained biases; train with bias='none'")
        if getattr(config, "modules_to_save", None):
            raise DiffusersLoraError(
                f"modules_to_save={config.modules_to_save}: diffusers LoRA files cannot carry fully trained modules"
            )
    layers = _lora_layers(root, adapter_name)
    if not layers:
        raise DiffusersLoraError(f"{type(root).__name__} holds no LoRA adapter named {adapter_name!r}")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    rslora = set()
    dora = False
    for name, layer in layers.items():
        if adapter_name in layer.lora_embedding_A:
            raise DiffusersLoraError(f"{name}: LoRA on embeddings cannot be loaded by diffusers pipelines")
        for key, tensor in layer.adapter_state_dict(adapter_name).items():
            tensors[f"{name}.{key}"] = tensor.detach().cpu()
        ranks[name] = layer.r[adapter_name]
        alphas[name] = layer.lora_alpha[adapter_name]
        rslora.add(_scaling_kind(name, layer, adapter_name))
        dora = dora or adapter_name in layer.lora_magnitude_vector
    if len(rslora) > 1:
        raise DiffusersLoraError("some layers scale by α/r and others by α/√r; one file holds one kind")
    settings = _settings(ranks, alphas)
    settings.update(use_rslora=rslora.pop(), use_dora=dora, lora_dropout=0.0, bias="none", init_lora_weights=True)
    return tensors, settings


def _settings(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """``r``/``lora_alpha`` (the most common values) and per-module exceptions keyed by the
    full module path, so every module's α and r round-trip exactly."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
    }


def save_lora_weights(
    save_directory: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
) -> str:
    """Writes the LoRA adapters of a pipeline's components as one diffusers LoRA file.

    ``pipeline.load_lora_weights(save_directory)`` then gives the pipeline the same
    adapted components (the file's metadata carries each module's r and α).

    Args:
        save_directory: the folder to write into (created if needed).
        unet, text_encoder, text_encoder_2: each a peftkit ``PeftModel`` or a module
            holding peftkit LoRA layers; components left None are not written.
        adapter_name: the adapter to export.
        weight_name: the file name (diffusers looks for ``pytorch_lora_weights.safetensors``).

    Returns:
        The path of the file written.
    """
    given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for component, module in given.items():
        if module is None:
            continue
        state, settings = diffusers_lora_state_dict(module, adapter_name)
        tensors.update({f"{component}.{k}": v for k, v in state.items()})
        metadata.update({f"{component}.{k}": v for k, v in settings.items()})
    if not tensors:
        raise DiffusersLoraError("save_lora_weights needs at least one of unet, text_encoder, text_encoder_2")
    path = os.path.join(os.fspath(save_directory), weight_name)
    save_tensors(path, tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    return path


# -- reading ------------------------------------------------------------------------------


def _file_of(path: str | os.PathLike, weight_name: str | None) -> str:
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither a LoRA file nor a folder")
    if weight_name:
        file = os.path.join(path, weight_name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {weight_name} in {path!r}")
        return file
    file = os.path.join(path, LORA_WEIGHT_NAME)
    if os.path.isfile(file):
        return file
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    raise FileNotFoundError(
        f"no {LORA_WEIGHT_NAME} in {path!r}" + (f"; pass weight_name= one of {others}" if others else "")
    )


def read_lora_weights(path: str | os.PathLike, weight_name: str | None = None) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """The LoRA adapters of a diffusers LoRA file, per component.

    Args:
        path: the file, or a folder holding ``pytorch_lora_weights.safetensors`` (or ``weight_name``).
        weight_name: the file name inside a folder.

    Returns:
        ``{component: (LoraConfig, tensors)}`` with tensors keyed as in a peftkit adapter
        file (``base_model.model.<module path>.lora_A.weight``) and the config targeting
        exactly the modules the file holds, each with its own r and α.

    Raises:
        DiffusersLoraError: keys of another layout (kohya's ``lora_unet_...``), or
            settings peftkit cannot reproduce.
    """
    from safetensors import safe_open

    file = _file_of(path, weight_name)
    with safe_open(file, framework="pt") as fh:
        raw_meta = (fh.metadata() or {}).get(METADATA_KEY)
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    metadata: dict[str, Any] = json.loads(raw_meta) if raw_meta else {}
    per_component: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not rest:
            raise DiffusersLoraError(
                f"{file}: key {key!r} does not start with one of {list(COMPONENTS)}; this reads diffusers' layout "
                "(unet.<module>.lora_A.weight). A kohya-style file (lora_unet_...) names modules ambiguously and is read "
                "against the components: load_lora_weights(path, unet=..., text_encoder=...) or "
                "peftkit.integrations.kohya.read_kohya_lora_weights"
            )
        if rest.endswith(".alpha"):  # a network alpha: α of one module
            alphas.setdefault(component, {})[rest[: -len(".alpha")]] = float(tensor.item())
            continue
        for old, new in _PROCESSOR_ALIASES.items():
            rest = rest.replace(old, new)
        for old, new in _FACTOR_ALIASES.items():
            if rest.endswith(old):
                rest = rest[: -len(old)] + new
                break
        per_component.setdefault(component, {})[rest] = tensor
    out = {}
    for component, state in per_component.items():
        meta = {k[len(component) + 1 :]: v for k, v in metadata.items() if k.startswith(component + ".")}
        config = _config_for(component, state, meta, alphas.get(component, {}))
        out[component] = (config, {f"base_model.model.{k}": v for k, v in state.items()})
    if not out:
        raise DiffusersLoraError(f"{file} holds no LoRA tensors")
    return out


def _config_for(component: str, state: dict[str, torch.Tensor], meta: dict[str, Any], network_alphas: dict[str, float]) -> Any:
    from peftkit.core.targeting import matches_key
    from peftkit.methods.lora.config import LoraConfig

    modules = sorted({k.split(".lora_")[0] for k in state if ".lora_" in k})
    if not modules:
        raise DiffusersLoraError(f"{component}: no lora_A/lora_B tensors found")
    for module in modules:
        if f"{module}.lora_A.weight" not in state or f"{module}.lora_B.weight" not in state:
            raise DiffusersLoraError(f"{component}.{module}: the file lacks its lora_A or lora_B weight")
    if meta.get("lora_bias"):
        raise DiffusersLoraError(f"{component}: the file's LoRA has biases on lora_B (lora_bias), which peftkit does not support")
    ranks = {m: int(state[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    if meta:
        r = int(meta.get("r", 8))
        alpha = meta.get("lora_alpha", r)
        rank_pattern, alpha_pattern = dict(meta.get("rank_pattern") or {}), dict(meta.get("alpha_pattern") or {})

        def pick(pattern: dict[str, Any], name: str, default: Any) -> Any:
            return next((v for k, v in pattern.items() if matches_key(name, k)), default)

        module_alphas = {m: pick(alpha_pattern, m, alpha) for m in modules}
        for m in modules:  # the tensors' shapes decide the rank
            if pick(rank_pattern, m, r) != ranks[m]:
                raise DiffusersLoraError(
                    f"{component}.{m}: the metadata gives rank {pick(rank_pattern, m, r)} but lora_A has {ranks[m]} rows"
                )
        extra = {"use_rslora": bool(meta.get("use_rslora", False)), "use_dora": bool(meta.get("use_dora", False))}
    else:
        # diffusers' rule without metadata: a module's α is its network alpha, else its rank (scale 1)
        module_alphas = {m: network_alphas.get(m, ranks[m]) for m in modules}
        extra = {"use_dora": any(k.endswith("lora_magnitude_vector") for k in state)}
    settings = _settings(ranks, module_alphas)
    return LoraConfig(**settings, **extra)


def load_lora_weights(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    weight_name: str | None = None,
) -> dict[str, Any]:
    """Wraps the given components with the LoRA adapters of a diffusers LoRA file, or of a
    kohya / A1111 file (``lora_unet_...`` keys; see :mod:`peftkit.integrations.kohya`).

    Args:
        path: the file, or a folder holding ``pytorch_lora_weights.safetensors``.
        unet, text_encoder, text_encoder_2: the plain (not yet wrapped) components; those
            the file has tensors for are wrapped, the others are left alone.
        adapter_name: the adapter's name in the returned models.
        is_trainable: keep the adapters trainable (else they are frozen and the models in eval mode).
        weight_name: the file name inside a folder.

    Returns:
        ``{component: PeftModel}`` for every component given that the file adapts.

    Raises:
        DiffusersLoraError: the file has tensors for a component that was not given.
        peftkit.AdapterStateError: a tensor's shape does not fit the model.
    """
    from safetensors import safe_open

    from peftkit.integrations.kohya import is_kohya_state_dict, load_kohya_lora_weights
    from peftkit.peft_model import PeftModel

    file = _file_of(path, weight_name)
    with safe_open(file, framework="pt") as fh:
        kohya = is_kohya_state_dict(fh.keys())
    if kohya:  # kohya / A1111 keys (lora_unet_...) are resolved against the components themselves
        return load_kohya_lora_weights(file, unet, text_encoder, text_encoder_2, adapter_name, is_trainable)
    given = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    adapters = read_lora_weights(file)
    missing = [c for c in adapters if given.get(c) is None]
    if missing:
        raise DiffusersLoraError(f"the file holds LoRA tensors for {missing}; pass those components too")
    out: dict[str, Any] = {}
    for component, (config, state) in adapters.items():
        module = given[component]
        assert module is not None
        config, state = _match_text_model_prefix(module, config, state)
        try:
            out[component] = PeftModel.from_state(module, config, state, adapter_name, is_trainable)
        except Exception:
            for done in out.values():  # the components wrapped before this one
                done.unload()
            raise
    return out


def _match_text_model_prefix(module: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """CLIP text encoders of transformers 5 have no ``text_model`` level; files written
    for older versions (and the reverse) name it. Paths are adjusted to fit ``module``."""
    names = {n for n, _ in module.named_modules()}
    targets = config.target_modules if isinstance(config.target_modules, list) else []
    if all(t in names for t in targets):
        return config, state
    prefix = "text_model."
    if all(t.startswith(prefix) and t[len(prefix):] in names for t in targets):
        fix = lambda s: s[len(prefix):] if s.startswith(prefix) else s  # noqa: E731
    elif all(prefix + t in names for t in targets):
        fix = lambda s: prefix + s  # noqa: E731
    else:
        return config, state  # let the targeting error name the modules that do not exist
    import copy

    config = copy.deepcopy(config)
    config.target_modules = [fix(t) for t in targets]
    config.rank_pattern = {fix(k): v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {fix(k): v for k, v in config.alpha_pattern.items()}
    head = "base_model.model."
    return config, {head + fix(k[len(head):]): v for k, v in state.items()}
