"""Combining LoRA adapters into a new one (``add_weighted_adapter``).

With ``ΔW_i = s_i·B_i·A_i`` and weights ``w_i``:
- ``"cat"``: ``A = [A_1; A_2; …]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, …]``; rank Σ r_i and
  ``ΔW = Σ w_i ΔW_i`` exactly.
- ``"svd"``: the best rank-k approximation of ``Σ w_i ΔW_i`` (k = ``svd_rank`` or the largest r_i).
- ``"linear"``: ``A = Σ c_i A_i``, ``B = Σ c_i B_i`` with ``c_i = √|w_i s_i|`` (sign on A);
  ranks must be equal. Cheap, but not the weighted sum of the updates.
The new adapter has scaling 1 (``lora_alpha = r``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from peftkit.core.layer import adapter_layers
from peftkit.core.modules_to_save import ModulesToSaveWrapper
from peftkit.core.tuner import delete_adapter, inject_adapter
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layer import LoraLayer

__all__ = ["COMBINATIONS", "add_weighted_lora"]

COMBINATIONS = ("linear", "cat", "svd")


def _flat(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = layer.factors(name)
    r = a.shape[0]
    return a.detach().reshape(r, -1).float(), b.detach().reshape(-1, r).float()


def _combine_layer(
    layer: LoraLayer, adapters: Sequence[str], weights: Sequence[float], how: str, svd_rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapter_names]
    if how == "cat":
        parts = [(_flat(layer, a), w * layer.scaling[a]) for a, w in present]
        return torch.cat([a for (a, _), _ in parts], 0), torch.cat([b * c for (_, b), c in parts], 1)
    if how == "linear":
        ranks = {layer.r[a] for a, _ in present}
        if len(ranks) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of equal rank; found ranks {sorted(ranks)}")
        new_a = new_b = None
        for a, w in present:
            fa, fb = _flat(layer, a)
            c = math.sqrt(abs(w * layer.scaling[a]))
            sign = 1.0 if w * layer.scaling[a] >= 0 else -1.0
            new_a = fa * c * sign if new_a is None else new_a + fa * c * sign
            new_b = fb * c if new_b is None else new_b + fb * c
        return new_a, new_b  # type: ignore[return-value]
    delta = sum(w * layer.scaling[a] * (fb @ fa) for a, w in present for fa, fb in [_flat(layer, a)])
    k = svd_rank or max(layer.r[a] for a, _ in present)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(k, s.shape[0])
    return vh[:k], u[:, :k] * s[:k]


@torch.no_grad()
def _fill(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    adapters: Sequence[str],
    adapter_name: str,
) -> None:
    """Copies the combined factors (and the first source's saved modules) into the new adapter."""
    for n, (a, b) in factors.items():
        ta, tb = layers[n].factors(adapter_name)
        ta.copy_(a.reshape(ta.shape))
        tb.copy_(b.reshape(tb.shape))
    for _, wrapper in adapter_layers(model):
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.adapter_names:
            source = next((a for a in adapters if a in wrapper.adapter_names), None)
            if source is not None:
                wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())


def add_weighted_lora(
    model: nn.Module,
    configs: dict[str, LoraConfig],
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> LoraConfig:
    """Adds adapter ``adapter_name`` to ``model``, the weighted combination of ``adapters``.

    Returns:
        The new adapter's config.
    """
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("adapters and weights must be non-empty lists of equal length")
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise ValueError(f"unknown adapters {missing}; loaded: {sorted(configs)}")
    if any(configs[a].use_dora for a in adapters):
        raise ValueError("DoRA adapters cannot be combined (their magnitudes do not add); merge them instead")
    layers = {n: layer for n, layer in adapter_layers(model) if isinstance(layer, LoraLayer) and set(adapters) & set(layer.adapter_names)}
    odd = [n for n, layer in layers.items() if not layer.has_one_factor_pair()]
    if odd:
        raise ValueError(f"adapters on {odd} cannot be combined: their updates are not one factor pair B·A of the "
                         "layer's weight (nn.MultiheadAttention, grouped convolutions, target_parameters); "
                         "combine adapters of linear, convolution and embedding layers")
    factors = {n: _combine_layer(layer, adapters, weights, combination_type, svd_rank) for n, layer in layers.items()}
    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    r = max(ranks.values())
    first = configs[adapters[0]]
    saved = sorted({m for a in adapters for m in (configs[a].modules_to_save or [])})
    config = replace(
        first,
        r=r,
        lora_alpha=r,
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        # Exact names: a listed name also matches longer paths ending with it ("proj" would
        # add "blocks.0.proj"), so the targets are a regex and the pattern keys anchored.
        target_modules="|".join(re.escape(n) for n in sorted(layers)),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern={f"^{re.escape(n)}$": k for n, k in ranks.items() if k != r},
        alpha_pattern={f"^{re.escape(n)}$": k for n, k in ranks.items() if k != r},
        modules_to_save=saved or None,
        task_type=None,
    )
    inject_adapter(model, config, adapter_name)
    try:
        _fill(model, layers, factors, adapters, adapter_name)
    except Exception:
        delete_adapter(model, adapter_name)
        raise
    config.task_type = first.task_type
    return config
