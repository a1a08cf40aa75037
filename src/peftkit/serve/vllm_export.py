"""``peftkit export RUN --for vllm``: an adapter folder that vLLM's LoRA serving accepts.

vLLM serves LoRA adapters in PEFT's format with these limits (its adapter checks): LoRA only
(no DoRA), no ``modules_to_save``, no trained biases, a rank of at most ``--max-lora-rank``
(one of 1, 8, 16, 32, 64, 128, 256, 320, 512), and one scale ``lora_alpha / r`` (or
``lora_alpha / √r`` with rsLoRA) for every module: ``rank_pattern`` / ``alpha_pattern`` are
not read. Lower ranks are therefore padded with zeros to the largest and per-module scales
folded into ``lora_B``, so the exported adapter computes what the original does under one
rank and one scale, in vLLM and in PEFT alike.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VllmExport:
    folder: str
    name: str
    base: str | None
    max_lora_rank: int
    folded_modules: int

    def command(self) -> str:
        base = self.base or "BASE_MODEL"
        return (f"vllm serve {base} --enable-lora --lora-modules {self.name}={self.folder} "
                f"--max-lora-rank {self.max_lora_rank}")


def _adapter_dir(source: str) -> tuple[str, str]:
    """(adapter folder, default name) of a run folder or an adapter folder."""
    source = os.path.normpath(source)
    if os.path.isfile(os.path.join(source, "adapter", "adapter_config.json")):
        return os.path.join(source, "adapter"), os.path.basename(source)
    if os.path.isfile(os.path.join(source, "adapter_config.json")):
        return source, os.path.basename(source)
    raise ValueError(f"{source!r} is neither a peftkit run folder (with adapter/) nor an adapter folder "
                     "(with adapter_config.json)")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    from peftkit.core.targeting import matches_key

    return next((value for key, value in patterns.items() if matches_key(module, key)), default)


def export_for_vllm(source: str, out: str, name: str | None = None) -> VllmExport:
    """Checks ``source`` (a run or adapter folder) against vLLM's limits and writes the adapter
    to ``out``. Raises ValueError naming what vLLM would refuse and what to do instead."""
    from peftkit.core.io import atomic_write_folder, atomic_write_text, load_tensors, save_tensors

    adapter_dir, default_name = _adapter_dir(source)
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"{adapter_dir} is a {kind} adapter; vLLM serves LoRA adapters only. Convert it first "
                         "(`peftkit convert RUN --to lora --rank R`) or merge it into the base (`peftkit merge`) "
                         "and serve the merged model")
    if config.get("use_dora"):
        raise ValueError("vLLM does not serve DoRA adapters (use_dora=true); merge it into the base with "
                         "`peftkit merge RUN --out DIR` and serve the merged model, or train plain LoRA")
    if config.get("modules_to_save"):
        raise ValueError(f"vLLM refuses adapters with modules_to_save ({config['modules_to_save']}): those modules are "
                         "whole trained copies, not low-rank factors. Merge the run into the base "
                         "(`peftkit merge RUN --out DIR`) and serve the merged model")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"vLLM does not load trained biases (bias={config.get('bias')!r}); train with bias='none' "
                         "or merge the run into the base")
    state = load_tensors(adapter_dir)
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    rs = bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def scale(rank: float, a: float) -> float:
        return a / math.sqrt(rank) if rs else a / rank

    pairs = []  # (A key, B key, module) per adapted module
    for key in state:
        for a_suffix, b_suffix in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if key.endswith(b_suffix):
                pairs.append((key[: -len(b_suffix)] + a_suffix, key, key[: -len(b_suffix) - 1]))
    top = max([int(state[b].shape[-1]) for _, b, _ in pairs] + [1])
    allowed = [x for x in VLLM_MAX_LORA_RANKS if x >= top]
    if not allowed:
        raise ValueError(f"rank {top} is more than vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
                         f"convert to a lower rank (`peftkit convert RUN --to lora --rank {VLLM_MAX_LORA_RANKS[-1]}`)")
    # One rank and one scale for all: lower ranks are padded with zero rows of A and zero columns
    # of B (the product is unchanged), and each module's scale is folded into its B.
    new_scale, folded = scale(top, alpha), 0
    for a_key, b_key, module in pairs:
        module = module.removeprefix("base_model.model.")
        ratio = scale(_pattern_value(rank_pattern, module, r), _pattern_value(alpha_pattern, module, alpha)) / new_scale
        a, b = state[a_key], state[b_key]
        pad = top - b.shape[-1]
        if pad:
            state[a_key] = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
            state[b_key] = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], dim=-1)
        if ratio != 1.0:
            state[b_key] = state[b_key] * ratio
        folded += bool(pad or ratio != 1.0)
    config["r"] = top
    config["rank_pattern"], config["alpha_pattern"] = {}, {}
    config["inference_mode"] = True

    def write(root: str) -> None:
        save_tensors(os.path.join(root, "adapter_model.safetensors"), state)
        atomic_write_text(os.path.join(root, "adapter_config.json"), json.dumps(config, indent=2, sort_keys=True))

    atomic_write_folder(out, write)
    return VllmExport(os.path.abspath(out), name or default_name, _base_of(source, config), allowed[0], folded)


def _base_of(source: str, config: dict) -> str | None:
    """The base to serve: the adapter's ``base_model_name_or_path``, else the run's model."""
    if config.get("base_model_name_or_path"):
        return config["base_model_name_or_path"]
    run_config = os.path.join(source, "config.yaml")
    if not os.path.isfile(run_config):
        return None
    import yaml

    from peftkit.train.modeling import resolve_model_path

    with open(run_config, encoding="utf-8") as fh:
        name = (yaml.safe_load(fh).get("model") or {}).get("name")
    return resolve_model_path(name) if isinstance(name, str) else None
