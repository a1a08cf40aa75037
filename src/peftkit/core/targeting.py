"""Choosing which modules a method adapts: pure functions over ``model.named_modules()``.

A target spec is one of
- a list of names: a module matches when its full name equals an entry or ends with
  ``"." + entry`` (a suffix at a dot boundary);
- a string: a regular expression that must match the full module name;
- ``"all-linear"``: every linear layer except a transformers model's output embeddings
  (as in Hugging Face PEFT; a plain module keeps its last layer).

Nothing here modifies the model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from peftkit.integrations.transformers import all_linear_exclusions, is_linear_like

__all__ = ["TargetError", "find_targets", "layer_index", "matches_key", "name_matches"]

ALL_LINEAR = "all-linear"
# Attribute names that hold the list of repeated blocks in common architectures.
_DEFAULT_LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "block", "encoder.layer", "decoder.layers", "stages")


class TargetError(ValueError):
    """A target spec that does not fit the model."""


def name_matches(name: str, entry: str) -> bool:
    """True when ``name`` is ``entry`` or ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def matches_key(name: str, key: str) -> bool:
    """Match used by ``rank_pattern`` / ``alpha_pattern`` keys: a suffix or a regex suffix."""
    if name_matches(name, key):
        return True
    try:
        return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None
    except re.error:
        return False


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index in ``name`` (``...layers.3.mlp`` -> 3), or None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or _DEFAULT_LAYER_PATTERNS)
    for pattern in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def _spec_matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, entry) for entry in spec)


def _close_names(wanted: Iterable[str], names: list[str]) -> str:
    pool = sorted({n.rsplit(".", 1)[-1] for n in names if n} | {".".join(n.split(".")[-2:]) for n in names if n})
    lines = []
    for entry in wanted:
        close = difflib.get_close_matches(entry, pool, n=5, cutoff=0.5)
        lines.append(f"  {entry!r}: closest module names are {close}" if close else f"  {entry!r}: no similar name")
    return "\n".join(lines)


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    is_supported: Callable[[nn.Module], bool],
    supported: str,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Names of the modules to adapt, in model order.

    Args:
        model: the model (not modified).
        target_modules: the target spec (see module docstring).
        is_supported: whether the method can wrap a module.
        supported: human-readable description of the supported types, for errors.
        exclude_modules: a spec of modules never to adapt.
        layers_to_transform: block indices to restrict to.
        layers_pattern: the attribute name(s) holding the blocks (``"layers"``, ``"h"``).
        skip: names already claimed by something else (e.g. ``modules_to_save``); these
            and their children are never targets.

    Raises:
        TargetError: when nothing matches (naming the closest module names), when an
            explicitly named module has an unsupported type, or the spec is malformed.
    """
    if target_modules is None:
        raise TargetError("target_modules is None: name the modules to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise TargetError(f"target_modules {target_modules!r} is not a valid regular expression: {exc}") from exc
    all_names = [n for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    skip = tuple(skip)
    heads = set(all_linear_exclusions(model)) if target_modules == ALL_LINEAR else set()
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]

    targets: list[str] = []
    unsupported: list[tuple[str, str]] = []
    for name in all_names:
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        module = modules[name]
        if target_modules == ALL_LINEAR:
            # a layer already wrapped by an adapter counts as what it wraps
            inner = getattr(module, "base_layer", None)
            if not is_linear_like(inner if isinstance(inner, nn.Module) else module) or name in heads:
                continue
        elif not _spec_matches(name, target_modules):
            continue
        if exclude_modules is not None and _spec_matches(name, exclude_modules):
            continue
        if layers_to_transform is not None:
            idx = layer_index(name, layers_pattern)
            if idx is None or idx not in layers_to_transform:
                continue
        if not is_supported(module):
            unsupported.append((name, type(module).__name__))
            continue
        targets.append(name)

    if unsupported:
        shown = ", ".join(f"{n} ({t})" for n, t in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise TargetError(
            f"target_modules matched modules of a type this method cannot adapt: {shown}{more}. "
            f"Supported: {supported}. Name the layers inside them instead (e.g. 'output.dense')."
        )
    if not targets:
        if target_modules == ALL_LINEAR:
            raise TargetError("'all-linear' found no linear layer to adapt (the output head is never targeted)")
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        where = f" in layers {list(layers_to_transform)}" if layers_to_transform is not None else ""
        raise TargetError(
            f"target_modules {wanted} matched no module of {type(model).__name__}{where}.\n"
            + _close_names(wanted, all_names)
        )
    if not isinstance(target_modules, str):
        missing = [e for e in target_modules if not any(name_matches(t, e) for t in targets)]
        if missing:
            import warnings

            warnings.warn(
                f"target_modules entries {missing} matched no module; the others were applied.\n"
                + _close_names(missing, all_names),
                stacklevel=3,
            )
    return targets


def find_modules_to_save(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """Full names of the modules listed in ``modules_to_save`` (suffix match)."""
    if not names:
        return []
    found = [n for n, _ in model.named_modules() if n and any(name_matches(n, e) for e in names)]
    # keep outermost matches only
    found = [n for n in found if not any(n != o and n.startswith(o + ".") for o in found)]
    return found
