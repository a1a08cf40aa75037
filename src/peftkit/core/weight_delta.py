"""What an adapter changes in the weights of the module it wraps: ``W' − W₀`` per parameter.

A mergeable adapter layer is one whose ``merge_one`` folds the adapter into its base
module. Its *weight delta* is then the difference it makes to each of the base module's
parameters, and every mergeable layer has one, whatever its formula: LoRA's ``s·B·A``,
(IA)³'s ``(l − 1) ⊙ W₀`` (and its bias), a sparse scatter, a Kronecker or Hadamard product,
a rotation ``R·W₀ − W₀``. :func:`weight_delta` finds it through ``merge_one`` alone: the
layer is merged into a float64 copy of itself and the copy's parameters are compared with
their values before the merge. float64 keeps the subtraction's rounding error (about 1e-16
of the weight) far below float32's, so the delta is exact to float32 precision, and it is
the change merging makes (a strength set by ``scale_adapter``, DoRA's renormalisation and
a changed bias included); the model itself is never touched.

A layer that cannot be merged (its ``merge_one`` raises NotImplementedError: bottleneck
adapters, which are non-linear) has no weight delta, and :class:`NotMergeableError` says so.
"""

from __future__ import annotations

import copy

import torch

from peftkit.core.layer import AdapterLayer

__all__ = ["NotMergeableError", "is_mergeable", "weight_delta"]


class NotMergeableError(ValueError):
    """An adapter whose effect is not a change of the wrapped module's weights."""


def is_mergeable(layer: AdapterLayer) -> bool:
    """Whether the layer's class folds adapters into its base module (defines ``merge_one``)."""
    return type(layer).merge_one is not AdapterLayer.merge_one


@torch.no_grad()
def weight_delta(layer: AdapterLayer, adapter_name: str, module_name: str = "") -> dict[str, torch.Tensor]:
    """``{parameter name: W' − W₀}`` of the base module's parameters that adapter
    ``adapter_name`` changes (float64, on the CPU; parameters left unchanged are absent).

    Args:
        layer: an adapter layer holding the adapter.
        adapter_name: the adapter.
        module_name: the layer's name in its model, for messages.

    Raises:
        NotMergeableError: the layer cannot be merged, or its base weights are quantised.
        KeyError: the layer holds no adapter of that name.
    """
    where = module_name or type(layer).__name__
    if adapter_name not in layer.adapter_names:
        raise KeyError(f"{where} holds no adapter named {adapter_name!r} (it holds {layer.adapter_names})")
    if not is_mergeable(layer):
        raise NotMergeableError(f"{where}: {type(layer).__name__} adapters cannot be merged into the weights")
    base = layer.base_layer
    params = dict(base.named_parameters())
    if any(not p.is_floating_point() for p in params.values()):
        raise NotMergeableError(
            f"{where}: the base weights are quantised ({type(base).__name__}); compute the delta on a float copy of the "
            "model (load it unquantised)"
        )
    # A float64 copy on the CPU, with only this adapter active and nothing merged yet.
    trial = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    trial.unmerge()
    trial.set_active([adapter_name])
    before = {k: p.detach().clone() for k, p in trial.base_layer.named_parameters()}
    try:
        trial.merge_one(adapter_name)
    except NotImplementedError as exc:
        raise NotMergeableError(f"{where}: {exc}") from None
    after = dict(trial.base_layer.named_parameters())
    return {k: after[k].detach() - v for k, v in before.items() if not torch.equal(after[k], v)}
