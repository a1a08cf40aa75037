"""Adapters that train the model's own parameters in place (full and layer-wise fine-tuning).

Such a method wraps no module (its registry entry has ``create_layer=None``): its adapter
*is* a set of the model's parameters, named by the method's ``trainable_base_parameters``
hook. Training changes them where they are, so memory is that of plain fine-tuning: no
second copy of any weight on the device.

The adapter is therefore always merged. To disable, unmerge, delete or unload it the
original values must come back from somewhere: with ``keep_original=True`` in the config a
copy of the trained parameters' original values is kept in CPU memory at injection, and
those operations swap the two sets (the values not in use wait in CPU memory). Without
it they raise an error that says so; ``merge_and_unload()`` always works.

An :class:`InPlaceAdapter` is attached to the model as a plain attribute (not a
submodule: the model's ``state_dict`` and ``named_modules`` stay as they were), and
:func:`peftkit.core.layer.adapter_layers` yields it with the name ``""``, so the core's
merge / disable / delete / unload / state-dict code treats it like any adapter layer.
A model holds at most one in-place adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import IN_PLACE_ATTRIBUTE as ATTRIBUTE
from peftkit.core.layer import AdapterLayer

__all__ = ["InPlaceAdapter", "attached_in_place", "parameters_under"]


def attached_in_place(model: nn.Module) -> InPlaceAdapter | None:
    """The in-place adapter attached to ``model``, if any."""
    found = model.__dict__.get(ATTRIBUTE)
    return found if isinstance(found, InPlaceAdapter) else None


class InPlaceAdapter(AdapterLayer):
    """The adapter of an in-place method: named parameters of ``model`` itself.

    Args:
        model: the model whose parameters are trained (the adapter attaches itself to it).
        adapter_name: the adapter's name.
        parameter_names: names (as in ``model.named_parameters()``) of the trained parameters.
        peft_type: the method's identifier.
        keep_original: keep a CPU copy of the original values so that the adapter can be
            disabled, unmerged, deleted and unloaded.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str,
        parameter_names: Sequence[str],
        peft_type: str,
        keep_original: bool,
    ) -> None:
        existing = attached_in_place(model)
        if existing is not None:
            raise ValueError(
                f"the model already holds the in-place adapter {existing.name!r}; in-place methods train the model's "
                "own weights, so a model holds one of them. Start from a fresh copy of the base model."
            )
        super().__init__(model)
        params = dict(model.named_parameters())
        missing = [n for n in parameter_names if n not in params]
        if missing:
            raise ValueError(f"the model has no parameters named {missing[:5]}")
        self.name = adapter_name
        self.peft_type = peft_type
        self.parameter_names = list(parameter_names)
        self.keep_original = keep_original
        # The values not in the model right now: the originals while the adapter is applied.
        self._elsewhere: dict[str, torch.Tensor] | None = (
            {n: params[n].detach().to("cpu", copy=True) for n in self.parameter_names} if keep_original else None
        )
        self.active_adapters = [adapter_name]
        self.merged_adapters = [adapter_name]  # the trained values are the model's own
        object.__setattr__(model, ATTRIBUTE, self)

    # -- what the core asks of an adapter layer ----------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return [self.name] if self.name is not None else []

    def _params(self) -> dict[str, nn.Parameter]:
        params = dict(self.base_layer.named_parameters())
        return {n: params[n] for n in self.parameter_names}

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        if adapter_name == self.name:
            yield from self._params().values()

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The trained values keyed by parameter name (from CPU memory while unmerged)."""
        if adapter_name != self.name:
            return {}
        if self.merged_adapters or self._elsewhere is None:
            return dict(self._params())
        return dict(self._elsewhere)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("an in-place adapter is not a module of the model and is never called")

    # -- swapping the trained and the original values ----------------------------------
    def _require_original(self, action: str) -> None:
        if self._elsewhere is None:
            raise RuntimeError(
                f"cannot {action}: this {self.peft_type} adapter trained the model's weights in place and no copy of "
                "the original values was kept. Create the config with keep_original=True (a CPU copy of the trained "
                "parameters), or use merge_and_unload() to keep the trained model."
            )

    @torch.no_grad()
    def _swap(self) -> None:
        assert self._elsewhere is not None
        for n, p in self._params().items():
            live = p.detach().to("cpu", copy=True)
            p.copy_(self._elsewhere[n].to(device=p.device, dtype=p.dtype))
            self._elsewhere[n] = live

    def merge_one(self, adapter_name: str) -> None:
        self._require_original("apply the adapter again")
        self._swap()

    def unmerge_one(self, adapter_name: str) -> None:
        self._swap()

    def unmerge(self) -> None:
        if self.merged_adapters:
            self._require_original("restore the original weights (unmerge or disable the adapter)")
        super().unmerge()

    @property
    def example_adapters(self) -> Sequence[str] | None:
        return None

    @example_adapters.setter
    def example_adapters(self, names: Sequence[str] | None) -> None:
        if names is not None:
            raise RuntimeError(
                f"a {self.peft_type} adapter lives in the model's own weights; it cannot be chosen per example"
            )

    # -- removal -----------------------------------------------------------------------
    def _detach(self) -> None:
        model = self.base_layer
        if model.__dict__.get(ATTRIBUTE) is self:
            del model.__dict__[ATTRIBUTE]
        self.name = None  # type: ignore[assignment]

    def delete_adapter(self, adapter_name: str) -> None:
        """Restores the original values (needs ``keep_original``) and detaches."""
        if adapter_name != self.name:
            return
        if self.merged_adapters:
            self._require_original("delete the adapter (its changes are in the model's weights)")
            self.unmerge()
        self._elsewhere = None
        self._detach()

    def unload(self, merge: bool) -> nn.Module:
        """The model with the trained values (``merge``) or the original ones."""
        if merge:
            if not self.merged_adapters:
                self.merge([self.name])
        elif self.merged_adapters:
            self._require_original("unload without merging (return the model as it was)")
            self.unmerge()
        model = self.base_layer
        self._elsewhere = None
        self._detach()
        return model


def parameters_under(
    model: nn.Module,
    module_names: Sequence[str],
    exclude: Sequence[str] | str | None = None,
    include_root: bool = False,
) -> list[str]:
    """Names of the parameters of ``model`` that lie inside one of ``module_names`` (the
    modules themselves included) and inside none of the modules ``exclude`` selects.

    Args:
        model: the model.
        module_names: full module names.
        exclude: a target spec (names matched as dot-suffixes, or a regex) of modules whose
            parameters, their submodules' included, are left out.
        include_root: also take parameters owned by ``model`` itself.

    Returns:
        Parameter names in model order (shared parameters once).
    """
    import re

    from peftkit.core.targeting import name_matches

    def excluded(name: str) -> bool:
        if exclude is None:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, name) is not None
        return any(name_matches(name, e) for e in exclude)

    chosen = set(module_names)
    out = []
    for pname, _ in model.named_parameters():
        parts = pname.split(".")[:-1]
        owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if not (any(o in chosen for o in owners) or (include_root and not parts)):
            continue
        if any(excluded(o) for o in owners):
            continue
        out.append(pname)
    return out
