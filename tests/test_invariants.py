"""The invariant table of DESIGN.md §6, for every registered method.

Rows are the cases of ``tests/invariant_cases.py`` (method × model × variant; LoRA: every
variant on every layer type); columns are the invariants. One test function runs one
cell. A cell that does not apply is skipped, and ``NOT_APPLICABLE`` says why; a
completeness test fails when a registered method or an invariant has no cell, so a new
method must be added here.

Invariants
- ``init_identity``: right after init the output equals the base output.
- ``merge_equals_unmerged``: merging the adapter into the weights keeps the output (a
  method that cannot merge must refuse, and change nothing).
- ``unmerge_restores``: merge then unmerge gives back the weights.
- ``save_load``: save -> load onto a fresh model reproduces the outputs exactly.
- ``trainable_only_method``: exactly the method's parameters are trainable, in number too.
- ``base_untouched``: training changes no frozen weight.
- ``disable_gives_base``: inside ``disable_adapter()`` the output is the base output.
- ``loss_decreases``: a few optimiser steps lower the loss.
- ``unload_gives_base``: ``unload()`` gives back the base model, weights and outputs.

In-place methods (layer-wise, full) train the model's weights where they are and restore
them only with ``keep_original=True``: without it, unmerging, disabling and unloading must
raise and change nothing, and those cells check exactly that.

Exact or within rounding: the very same computation on the same tensors (a reloaded
adapter, a disabled layer that calls its base layer, values copied back) must give the
same bits. Two computations of the same function (a wrapped layer against the plain one,
merged against unmerged weights) agree within float32 rounding only: which bits they
round differently depends on the CPU's BLAS kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapter_checks import (
    MODEL_REL,
    assert_rounding_close,
    frozen_snapshot,
    is_base_parameter,
    perturb,
    rounding_tolerance,
    train_steps,
    weights_snapshot,
)
from invariant_cases import CASES, LORA_LAYER_TYPES, LORA_REFUSED, LORA_ROWS, LORA_VARIANTS, Case
from models import BUILDERS, build, inputs_for, output_of
from peftkit import PeftModel, get_peft_model, list_methods
from peftkit.core.layer import adapter_layers

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*token_id.*"),
    pytest.mark.filterwarnings("ignore:Unsupported layer type"),
]

INVARIANTS = (
    "init_identity",
    "merge_equals_unmerged",
    "unmerge_restores",
    "save_load",
    "trainable_only_method",
    "base_untouched",
    "disable_gives_base",
    "loss_decreases",
    "unload_gives_base",
)

_PROMPTS = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
_FED = "changes what the model is fed, not its weights"

# (method, or method/variant; invariant) -> why the cell does not apply
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    **{(m, "init_identity"): "virtual tokens are new inputs: the output changes from the start (as in PEFT)"
       for m in _PROMPTS},
    **{(m, "unmerge_restores"): f"{_FED}: nothing to merge or unmerge (merge_equals_unmerged checks the refusal)"
       for m in _PROMPTS},
    ("BOTTLENECK", "unmerge_restores"): "non-linear, cannot be merged: nothing to unmerge (merge_equals_unmerged "
                                        "checks the refusal)",
    ("LORA/pissa", "disable_gives_base"): "PiSSA moves W's principal part into the adapter: disabled = residual model",
    ("LORA/pissa", "unload_gives_base"): "PiSSA moves W's principal part into the adapter: unloaded = residual model",
    ("LORA@conv2d_grouped", "unmerge_restores"): "a grouped convolution's LoRA cannot be merged: nothing to unmerge "
                                                 "(merge_equals_unmerged checks the refusal)",
}

# Merge then unmerge rounds each weight a few times (add then subtract; DoRA also scales
# and unscales), relative to the larger of the weight and the merged weight. (Measured:
# at most 0.3 eps of the merged weights' largest entry.)
UNMERGE_REL = rounding_tolerance(4)


def _reason(case: Case, invariant: str) -> str | None:
    for tag in case.tags:
        if (tag, invariant) in NOT_APPLICABLE:
            return NOT_APPLICABLE[tag, invariant]
    return None


CELLS = [
    pytest.param(name, invariant, id=f"{name}-{invariant}",
                 marks=[pytest.mark.skip(reason=_reason(case, invariant))] if _reason(case, invariant) else [])
    for name, case in CASES.items()
    for invariant in INVARIANTS
]


# -- building a cell --------------------------------------------------------------------
_PLAIN: dict[str, nn.Module] = {}
_BASE_OUT: dict[str, torch.Tensor] = {}


def _plain(kind: str) -> nn.Module:
    """The plain model of ``kind``, built once and shared by the cells: checks only read it
    (copying a model is most of the cost of a cell)."""
    if kind not in _PLAIN:
        _PLAIN[kind] = build(kind).requires_grad_(False)
        _BASE_OUT[kind] = output_of(_PLAIN[kind], inputs_for(kind))
    return _PLAIN[kind]


@dataclass
class Cell:
    """What a check gets: the case, the wrapped model, a pristine plain model, inputs."""

    case: Case
    model: PeftModel
    plain: nn.Module
    inputs: dict[str, torch.Tensor]
    tmp_path: Any

    @property
    def config(self) -> Any:
        return self.model.peft_config["default"]

    @property
    def base(self) -> torch.Tensor:
        return _BASE_OUT[self.case.kind]

    @property
    def restorable(self) -> bool:
        """Whether unmerge, disable and unload can give the original weights back."""
        return not self.case.traits.in_place or self.case.keep_original

    def output(self, model: nn.Module | None = None) -> torch.Tensor:
        return output_of(self.model if model is None else model, self.inputs)

    def perturb_adapter(self) -> None:
        """Moves the adapter away from its start, so that it changes the output. Only what
        disabling or unloading can take back: not the base biases that LoRA's bias="all"
        trains (disabled, they stay trained, as in PEFT); in place, the trained weights."""
        plain_names = None if self.case.traits.in_place else {n for n, _ in self.plain.named_parameters()}
        perturb(self.model, plain_names=plain_names, scale=self.case.perturb_scale)


def _wrap(name: str, tmp_path: Any) -> Cell:
    case = CASES[name]
    model = get_peft_model(build(case.kind), case.config())
    return Cell(case, model, _plain(case.kind), inputs_for(case.kind), tmp_path)


def _real_positions(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The logits of the real tokens (a decoder's logits of virtual tokens dropped)."""
    return out[:, -like.shape[1]:] if out.dim() == 3 and out.shape[1] > like.shape[1] else out


def _assert_has_effect(adapted: torch.Tensor, base: torch.Tensor) -> None:
    # ten times the tolerance of the comparisons, so that they mean something
    adapted = _real_positions(adapted, base)
    assert (adapted - base).abs().max() > 10 * MODEL_REL * base.abs().max(), "the adapter has no effect on the output"


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool,
                         merged: dict[str, torch.Tensor] | None = None) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        if exact:
            assert torch.equal(got[key], expected[key]), key
            continue
        assert merged is not None
        scale = max(expected[key].abs().max().item(), merged[key].abs().max().item())
        assert_rounding_close(got[key], expected[key], UNMERGE_REL, msg=key, scale=scale)


def _set_fields(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that differ from their defaults (the others the method may
    fill in when it wraps a model: default targets, fan_in_fan_out for GPT-2's Conv1D...)."""
    values = config.to_dict()
    out = {}
    for f in dataclasses.fields(config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in values and values[f.name] != default:
            out[f.name] = values[f.name]
    return out


def _plain_weights(c: Cell, model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under their plain names, adapter parameters left out."""
    plain = {n for n, _ in c.plain.state_dict().items()}
    return {k: v for k, v in weights_snapshot(model).items() if k in plain}


# -- the invariants -----------------------------------------------------------------------
def check_init_identity(c: Cell) -> None:
    # The adapter adds an exact zero (or scales by an exact one), but the wrapped layer may
    # reach W₀x through another kernel than the plain layer (a fused product, a 2-D view).
    assert_rounding_close(c.output(), c.base, MODEL_REL)


def check_merge_equals_unmerged(c: Cell) -> None:
    c.perturb_adapter()
    unmerged = c.output()
    _assert_has_effect(unmerged, c.base)
    if not c.case.traits.mergeable or c.case.merge_refused:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            c.model.merge_adapter()
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            c.model.merge_and_unload()
        assert torch.equal(c.output(), unmerged), "a refused merge changed the model"
        return
    c.model.merge_adapter()
    assert_rounding_close(c.output(), unmerged, MODEL_REL)
    if not c.case.traits.in_place:  # in place, unmerging gives the original weights back (unmerge_restores)
        c.model.unmerge_adapter()
        assert_rounding_close(c.output(), unmerged, MODEL_REL)
    merged_model = c.model.merge_and_unload()
    assert not list(adapter_layers(merged_model))
    assert_rounding_close(c.output(merged_model), unmerged, MODEL_REL)


def check_unmerge_restores(c: Cell) -> None:
    c.perturb_adapter()
    inner = c.model.get_base_model()
    if not c.restorable:
        now = weights_snapshot(inner)
        with pytest.raises(RuntimeError, match="keep_original=True"):
            c.model.unmerge_adapter()
        _assert_same_weights(weights_snapshot(inner), now, exact=True)  # nothing changed
        return
    if c.case.traits.in_place:  # always merged: the originals are the plain model's
        before = merged = _plain_weights(c, c.plain)
    else:
        before = _plain_weights(c, inner)
        c.model.merge_adapter()
        merged = _plain_weights(c, inner)
        assert any(not torch.equal(before[k], merged[k]) for k in before), "merging changed no weight"
    c.model.unmerge_adapter()
    _assert_same_weights(_plain_weights(c, inner), before, exact=c.case.traits.exact_unmerge, merged=merged)


def check_save_load(c: Cell) -> None:
    c.perturb_adapter()  # every trainable tensor, trained biases and heads included
    expected = c.output()
    c.model.save_pretrained(c.tmp_path)
    state = load_file(c.tmp_path / "adapter_model.safetensors")
    saved = c.case.saved or c.case.count
    assert sum(t.numel() for t in state.values()) == saved(c.plain, c.config)
    reloaded = PeftModel.from_pretrained(build(c.case.kind), c.tmp_path)
    assert torch.equal(c.output(reloaded), expected)  # the same tensors through the same code: the same bits
    assert reloaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference
    config = reloaded.peft_config["default"]
    assert type(config) is type(c.config)
    loaded = config.to_dict() | {"inference_mode": False}
    assert loaded == c.config.to_dict() | {"inference_mode": False}
    given = _set_fields(c.case.config())  # what the user set is what the file keeps
    assert {k: loaded[k] for k in given} == given


def check_trainable_only_method(c: Cell) -> None:
    trainable = {n: p for n, p in c.model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert c.case.traits.owns(name, c.case, c.config), f"{name} should be frozen"
    n_trainable, n_total = c.model.get_nb_trainable_parameters()
    assert n_trainable == c.case.count(c.plain, c.config)
    # every weight of the plain model is still there, once; the method adds its own
    # parameters (trainable, or never trained) and nothing else
    plain_names = {n for n, _ in c.plain.named_parameters()}
    trained_base = sum(p.numel() for n, p in trainable.items() if is_base_parameter(c.model, n, plain_names))
    frozen_added = c.case.frozen_added(c.plain, c.config) if c.case.frozen_added else 0
    plain_total = sum(p.numel() for p in c.plain.parameters())
    assert n_total == plain_total + n_trainable - trained_base + frozen_added
    if c.case.check_targets:
        c.case.check_targets(c.model.get_base_model(), c.plain, c.config)


def check_base_untouched(c: Cell) -> None:
    frozen = frozen_snapshot(c.model)
    trainable = {n: p.detach().clone() for n, p in c.model.named_parameters() if p.requires_grad}
    train_steps(c.model, c.inputs, steps=3, lr=c.case.lr)
    for name, p in c.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed in training"
    assert any(not torch.equal(p, trainable[n]) for n, p in c.model.named_parameters() if n in trainable)


def check_disable_gives_base(c: Cell) -> None:
    c.perturb_adapter()
    adapted = c.output()
    _assert_has_effect(adapted, c.base)
    if not c.restorable:
        with pytest.raises(RuntimeError, match="keep_original=True"), c.model.disable_adapter():
            pass
        assert torch.equal(c.output(), adapted)
        return
    with c.model.disable_adapter():
        assert torch.equal(c.output(), c.base)  # the base layers' own computation
    assert torch.equal(c.output(), adapted)


def check_loss_decreases(c: Cell) -> None:
    losses = train_steps(c.model, c.inputs, steps=5, lr=c.case.lr)
    assert losses[-1] < losses[0], losses


def check_unload_gives_base(c: Cell) -> None:
    c.perturb_adapter()
    if not c.restorable:
        with pytest.raises(RuntimeError, match="merge_and_unload"):
            c.model.unload()
        assert list(adapter_layers(c.model.get_base_model())), "a refused unload removed the adapter"
        return
    base = c.model.unload()
    assert not list(adapter_layers(base))
    _assert_same_weights(weights_snapshot(base), weights_snapshot(c.plain), exact=True)
    assert torch.equal(c.output(base), c.base)


CHECKS = {name: globals()[f"check_{name}"] for name in INVARIANTS}


@pytest.mark.parametrize(("case", "invariant"), CELLS)
def test_invariant(case: str, invariant: str, tmp_path) -> None:
    CHECKS[invariant](_wrap(case, tmp_path))


# -- the table is complete ------------------------------------------------------------------
def test_table_covers_every_method_and_invariant() -> None:
    """Each registered method has rows, and each invariant runs for each method, unless a
    reason says why it cannot; every reason names a known method and invariant."""
    methods = set(list_methods())
    assert {case.method for case in CASES.values()} == methods
    assert set(CHECKS) == set(INVARIANTS) == {n.removeprefix("check_") for n in globals() if n.startswith("check_")}
    for method in methods:
        for invariant in INVARIANTS:
            runs = any(case.method == method and _reason(case, invariant) is None for case in CASES.values())
            assert runs or (method, invariant) in NOT_APPLICABLE, (method, invariant)
    tags = {tag for case in CASES.values() for tag in case.tags}
    for (tag, invariant), reason in NOT_APPLICABLE.items():
        assert tag in tags and invariant in INVARIANTS and len(reason) > 20, (tag, invariant)
    assert {case.kind for case in CASES.values()} == set(BUILDERS)


def test_lora_rows_cover_every_variant_and_layer_type() -> None:
    """LoRA's rows: each variant meets each layer type, unless the library refuses the
    pair (``LORA_REFUSED`` says why); each variant checks each invariant."""
    lora = [case for case in CASES.values() if case.method == "LORA"]
    assert {row.label for row in LORA_ROWS.values()} == LORA_LAYER_TYPES
    assert {row.kind for row in LORA_ROWS.values()} == set(BUILDERS)
    present = {(case.row, case.variant) for case in lora}
    for row_name, row in LORA_ROWS.items():
        for variant in LORA_VARIANTS:
            assert ((row_name, variant) in present) != ((row.label, variant) in LORA_REFUSED), (row_name, variant)
    for variant in LORA_VARIANTS:
        for invariant in INVARIANTS:
            if (f"LORA/{variant}", invariant) not in NOT_APPLICABLE:
                assert any(case.variant == variant and _reason(case, invariant) is None for case in lora)
