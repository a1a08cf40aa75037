"""The invariant table of DESIGN.md §6 for LoRA: every variant on every layer type.

Rows are (layer type or model) × variant; columns are the invariants. One test function
runs one cell. Cells that do not apply are not generated; ``NOT_APPLICABLE`` says why.

Invariants
- ``init_identity``: right after init the output equals the base output.
- ``merge_equals_unmerged``: merging the adapter into the weights keeps the output.
- ``unmerge_restores``: merge then unmerge gives back the weights (tight tolerance).
- ``save_load``: save -> load onto a fresh model reproduces the outputs exactly.
- ``trainable_only_method``: exactly the method's parameters are trainable, in number too.
- ``base_untouched``: training changes no frozen weight.
- ``disable_gives_base``: inside ``disable_adapter()`` the output is the base output.
- ``loss_decreases``: a few optimiser steps lower the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from adapter_checks import base_name, frozen_snapshot, perturb, train_steps, weights_snapshot
from models import build, inputs_for, output_of
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.layer import adapter_layers


@dataclass(frozen=True)
class Row:
    """A layer type (or model) that LoRA adapts."""

    kind: str  # model in tests/models.py
    targets: tuple[str, ...]
    layer_type: str  # class name of the wrapped modules
    head: str  # a module for the modules_to_save variant


ROWS = {
    # one small module per layer type: every variant
    "linear": Row("mlp", ("lin0", "lin1"), "Linear", "head"),
    "gpt2_conv1d": Row("gpt2", ("c_attn", "c_proj"), "Conv1D", "ln_f"),
    "conv1d": Row("cnn", ("conv1d",), "Conv1d", "head"),
    "conv2d": Row("cnn", ("conv1", "conv2"), "Conv2d", "head"),
    "embedding": Row("mlp", ("emb",), "Embedding", "head"),
    # the transformers models of tests/models.py
    "bert": Row("bert", ("query", "value"), "Linear", "classifier"),
    "llama": Row("llama", ("q_proj", "v_proj"), "Linear", "lm_head"),
    "llama_embedding": Row("llama", ("embed_tokens",), "Embedding", "lm_head"),
    "t5": Row("t5", ("q", "v"), "Linear", "lm_head"),
    "vit": Row("vit", ("q_proj", "v_proj"), "Linear", "classifier"),
}


@dataclass(frozen=True)
class Variant:
    options: dict[str, Any] = field(default_factory=dict)
    modules_to_save: bool = False


VARIANTS = {
    "plain": Variant(),
    "rslora": Variant({"use_rslora": True, "lora_alpha": 16}),
    "dora": Variant({"use_dora": True}),
    "gaussian": Variant({"init_lora_weights": "gaussian"}),
    "pissa": Variant({"init_lora_weights": "pissa"}),
    "bias_all": Variant({"bias": "all"}),
    "bias_lora_only": Variant({"bias": "lora_only"}),
    "modules_to_save": Variant(modules_to_save=True),
}

INVARIANTS = (
    "init_identity",
    "merge_equals_unmerged",
    "unmerge_restores",
    "save_load",
    "trainable_only_method",
    "base_untouched",
    "disable_gives_base",
    "loss_decreases",
)

# (row layer type or row name, variant, invariant or None for all) -> why the cell is absent
NOT_APPLICABLE: dict[tuple[str, str, str | None], str] = {
    ("Embedding", "dora", None): "DoRA on nn.Embedding is refused (tests/test_errors.py)",
    ("Conv1d", "pissa", None): "PiSSA initialises linear layers only (refused on convolutions)",
    ("Conv2d", "pissa", None): "PiSSA initialises linear layers only (refused on convolutions)",
    ("Embedding", "pissa", None): "PiSSA initialises linear layers only (refused on embeddings)",
    ("*", "pissa", "disable_gives_base"): "PiSSA moves W's principal part into the adapter: disabled = residual model",
}


def _applies(row: Row, variant: str, invariant: str) -> bool:
    for key in ((row.layer_type, variant, None), ("*", variant, invariant)):
        if key in NOT_APPLICABLE:
            return False
    return True


CELLS = [
    pytest.param(row_name, variant, invariant, id=f"{row_name}-{variant}-{invariant}")
    for row_name, row in ROWS.items()
    for variant in VARIANTS
    for invariant in INVARIANTS
    if _applies(row, variant, invariant)
]


# -- building a cell --------------------------------------------------------------------
def _config(row: Row, variant: Variant) -> LoraConfig:
    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": list(row.targets)}
    kwargs.update(variant.options)
    if variant.modules_to_save:
        kwargs["modules_to_save"] = [row.head]
    return LoraConfig(**kwargs)


def _matches(name: str, entries: tuple[str, ...]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


@dataclass
class Cell:
    """What a check gets: the wrapped model, a pristine plain model, inputs, config."""

    row: Row
    model: PeftModel
    plain: nn.Module
    inputs: dict[str, torch.Tensor]
    config: LoraConfig
    tmp_path: Any


def _wrap(row_name: str, variant_name: str, tmp_path: Any) -> Cell:
    row, variant = ROWS[row_name], VARIANTS[variant_name]
    config = _config(row, variant)
    plain = build(row.kind)
    model = get_peft_model(build(row.kind), config)
    wrapped = {n: type(layer.base_layer).__name__ for n, layer in adapter_layers(model.get_base_model())
               if not n.endswith(row.head)}
    expected = [n for n, _ in plain.named_modules() if _matches(n, row.targets)]
    assert sorted(wrapped) == sorted(expected)
    assert set(wrapped.values()) == {row.layer_type}
    return Cell(row, model, plain, inputs_for(row.kind), config, tmp_path)


def _expected_trainable(plain: nn.Module, row: Row, config: LoraConfig) -> int:
    """The number of trainable parameters, from the layer shapes alone."""
    r, total = config.r, 0
    for name, module in plain.named_modules():
        if not _matches(name, row.targets):
            continue
        w = module.weight
        if isinstance(module, nn.Embedding):
            total += r * (w.shape[0] + w.shape[1])
            continue
        if type(module).__name__ == "Conv1D":
            fan_in, out = w.shape[0], w.shape[1]
        else:
            fan_in, out = w[0].numel(), w.shape[0]
        total += r * (fan_in + out) + (out if config.use_dora else 0)
        if config.bias == "lora_only" and getattr(module, "bias", None) is not None:
            total += module.bias.numel()
    if config.bias == "all":
        total += sum(p.numel() for n, p in plain.named_parameters() if n.endswith("bias"))
    if config.modules_to_save:
        total += sum(p.numel() for p in plain.get_submodule(_full_name(plain, row.head)).parameters())
    return total


def _full_name(plain: nn.Module, entry: str) -> str:
    return next(n for n, _ in plain.named_modules() if _matches(n, (entry,)))


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding, relative to the outputs' size (BERT's logits are
    ~0.03, T5's ~5)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=1e-4)


def _assert_has_effect(adapted: torch.Tensor, base: torch.Tensor) -> None:
    # ten times the tolerance of `_assert_close`, so that the comparisons mean something
    assert (adapted - base).abs().max() > 1e-3 * base.abs().max(), "the adapter has no effect on the output"


# -- the invariants -----------------------------------------------------------------------
def check_init_identity(c: Cell) -> None:
    expected = output_of(c.plain, c.inputs)
    got = output_of(c.model, c.inputs)
    if c.config.init_lora_weights == "pissa":
        # the residual W - s·B·A plus the branch s·B·A equal W up to rounding
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:
        assert torch.equal(got, expected)


def check_merge_equals_unmerged(c: Cell) -> None:
    perturb(c.model)
    unmerged = output_of(c.model, c.inputs)
    _assert_has_effect(unmerged, output_of(c.plain, c.inputs))
    c.model.merge_adapter()
    _assert_close(output_of(c.model, c.inputs), unmerged)
    c.model.unmerge_adapter()
    _assert_close(output_of(c.model, c.inputs), unmerged)
    merged_model = c.model.merge_and_unload()
    assert not list(adapter_layers(merged_model))
    _assert_close(output_of(merged_model, c.inputs), unmerged)


def check_unmerge_restores(c: Cell) -> None:
    perturb(c.model)
    before = weights_snapshot(c.model.get_base_model())
    c.model.merge_adapter()
    merged = weights_snapshot(c.model.get_base_model())
    changed = [k for k in before if not torch.equal(before[k], merged[k])]
    assert changed, "merging changed no weight"
    c.model.unmerge_adapter()
    after = weights_snapshot(c.model.get_base_model())
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=1e-6, msg=key)


def check_save_load(c: Cell) -> None:
    perturb(c.model)  # every trainable tensor, trained biases included
    expected = output_of(c.model, c.inputs)
    c.model.save_pretrained(c.tmp_path)
    reloaded = PeftModel.from_pretrained(build(c.row.kind), c.tmp_path)
    assert torch.equal(output_of(reloaded, c.inputs), expected)
    assert type(reloaded.peft_config["default"]) is LoraConfig
    assert reloaded.peft_config["default"].to_dict() | {"inference_mode": False} == c.config.to_dict() | {
        "inference_mode": False,
        "base_model_name_or_path": reloaded.peft_config["default"].base_model_name_or_path,
    }


def check_trainable_only_method(c: Cell) -> None:
    trainable = {n for n, p in c.model.named_parameters() if p.requires_grad}
    lora_parts = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
    for name in trainable:
        parts = name.split(".")
        is_lora = bool(lora_parts & set(parts)) and "default" in parts
        is_saved = ".modules_to_save.default." in name
        is_bias = name.endswith("bias") and c.config.bias != "none"
        assert is_lora or is_saved or is_bias, f"{name} should be frozen"
        if is_bias and c.config.bias == "lora_only":
            assert name.endswith("base_layer.bias") and _matches(base_name(name).rsplit(".", 1)[0], c.row.targets)
    n_trainable, n_total = c.model.get_nb_trainable_parameters()
    assert n_trainable == _expected_trainable(c.plain, c.row, c.config)
    assert n_total == sum(p.numel() for p in c.model.parameters())


def check_base_untouched(c: Cell) -> None:
    frozen = frozen_snapshot(c.model)
    trainable = {n: p.detach().clone() for n, p in c.model.named_parameters() if p.requires_grad}
    train_steps(c.model, c.inputs, steps=3)
    for name, p in c.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed in training"
    assert any(not torch.equal(p, trainable[n]) for n, p in c.model.named_parameters() if n in trainable)


def check_disable_gives_base(c: Cell) -> None:
    perturb(c.model, plain_names={n for n, _ in c.plain.named_parameters()})
    base = output_of(c.plain, c.inputs)
    adapted = output_of(c.model, c.inputs)
    _assert_has_effect(adapted, base)
    with c.model.disable_adapter():
        assert torch.equal(output_of(c.model, c.inputs), base)
    assert torch.equal(output_of(c.model, c.inputs), adapted)


def check_loss_decreases(c: Cell) -> None:
    losses = train_steps(c.model, c.inputs, steps=5)
    assert losses[-1] < losses[0], losses


CHECKS = {name: globals()[f"check_{name}"] for name in INVARIANTS}


@pytest.mark.parametrize(("row_name", "variant", "invariant"), CELLS)
def test_lora_invariant(row_name: str, variant: str, invariant: str, tmp_path) -> None:
    CHECKS[invariant](_wrap(row_name, variant, tmp_path))


def test_table_covers_every_variant_and_layer_type() -> None:
    """The table is complete: each variant meets each layer type (where it applies) and
    each invariant is checked for each variant."""
    cells = {(p.values[0], p.values[1], p.values[2]) for p in CELLS}
    layer_types = {row.layer_type for row in ROWS.values()}
    assert layer_types == {"Linear", "Conv1D", "Conv1d", "Conv2d", "Embedding"}
    assert {row.kind for row in ROWS.values()} == {"bert", "gpt2", "llama", "t5", "vit", "mlp", "cnn"}
    for variant in VARIANTS:
        for invariant in INVARIANTS:
            if ("*", variant, invariant) not in NOT_APPLICABLE:
                assert any(v == variant and i == invariant for _, v, i in cells), (variant, invariant)
    for row_name in ROWS:
        assert any(r == row_name for r, _, _ in cells)
