"""The layer types LoRA adapts beyond linear layers, where the invariant table
(tests/invariant_cases.py, the ``zoo`` rows) and the interop table (tests/test_interop_peft.py)
do not reach: nn.MultiheadAttention's files against Hugging Face PEFT, refusals, nested
parameter layers with several adapters, and merges refused before anything changes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapter_checks import INTEROP_REL, assert_rounding_close, perturb, weights_snapshot
from models import Experts, build, inputs_for, output_of
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.layer import adapter_layers
from peftkit.core.targeting import TargetError

ZOO = inputs_for("zoo")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _with_attention_update(state: dict[str, torch.Tensor], out_times: float) -> nn.Module:
    """The plain Zoo with ``W_in + s·B·A`` and ``W_out + out_times·s·B'·A'`` written into its
    attention (s = α/r = 2), from the file's tensors."""
    plain = build("zoo")
    key = "base_model.model.attn."
    with torch.no_grad():
        plain.attn.in_proj_weight += 2 * state[key + "lora_B.weight"] @ state[key + "lora_A.weight"]
        plain.attn.out_proj.weight += (out_times * 2 * state[key + "base_layer.out_proj.lora_B.weight"]
                                       @ state[key + "base_layer.out_proj.lora_A.weight"])
    return plain


@pytest.mark.parametrize("writer", ["peftkit", "peft"])
def test_multihead_attention_files_move_both_ways_with_peft(writer: str, tmp_path) -> None:
    """Both libraries write and read the same keys and tensors. Their outputs differ by
    PEFT 0.21's known bug (huggingface/peft#3774): its forward adds the output projection's
    update twice. So each output is checked against the plain model with the file's update
    written into the weights: once (peftkit), twice (PEFT)."""
    peft = pytest.importorskip("peft")
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["attn"], "init_lora_weights": False}
    if writer == "peftkit":
        writer_model = get_peft_model(build("zoo"), LoraConfig(**kwargs))
    else:
        writer_model = _quiet(peft.get_peft_model, build("zoo"), peft.LoraConfig(**kwargs))
    perturb(writer_model)
    _quiet(writer_model.save_pretrained, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(state) == [f"base_model.model.attn.{k}" for k in (
        "base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight", "lora_A.weight", "lora_B.weight")]
    ours = PeftModel.from_pretrained(build("zoo"), tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, build("zoo"), tmp_path)
    reference_once = output_of(_with_attention_update(state, 1.0), ZOO)
    assert_rounding_close(output_of(ours, ZOO), reference_once, INTEROP_REL)
    assert_rounding_close(output_of(theirs, ZOO), output_of(_with_attention_update(state, 2.0), ZOO), INTEROP_REL)
    assert (output_of(theirs, ZOO) - reference_once).abs().max() > 1e-3  # the bug shows: the check can tell
    ours.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("target", "config", "match"),
    [
        ("gconv", {"r": 3}, "groups=2 needs a rank divisible by 2.*r=2"),
        ("gconv", {"use_dora": True}, "use_dora is not supported on grouped convolutions"),
        ("attn", {"use_dora": True}, "use_dora is not supported on nn.MultiheadAttention"),
        ("experts.gate_up_proj", {"lora_dropout": 0.1}, "target_parameters.*lora_dropout"),
        ("experts.gate_up_proj", {"use_dora": True}, "target_parameters.*use_dora"),
        ("experts.nothing", {}, "matched no parameter"),
    ],
    ids=["grouped_rank", "grouped_dora", "attention_dora", "parameter_dropout", "parameter_dora", "parameter_missing"],
)
def test_refused_before_the_model_changes(target: str, config: dict, match: str) -> None:
    model = build("zoo")
    before = weights_snapshot(model)
    where = {"target_parameters": [target]} if "." in target else {"target_modules": [target]}
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LoraConfig(**{"r": 4, **where, **config}))
    assert not list(adapter_layers(model))
    after = weights_snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_grouped_merge_refused_before_any_layer_merges() -> None:
    """A model with a mergeable layer first (the head) and a grouped convolution: merging
    is refused as a whole, the head's weight untouched, the outputs as before."""
    model = get_peft_model(build("zoo"), LoraConfig(r=4, target_modules=["head", "gconv"], init_lora_weights=False))
    expected = output_of(model, ZOO)
    head = model.get_base_model().head.base_layer.weight.clone()
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(NotImplementedError, match="grouped convolution.*cannot be merged"):
            merge()
        assert torch.equal(model.get_base_model().head.base_layer.weight, head)
        assert torch.equal(output_of(model, ZOO), expected)


def test_parameter_layers_take_a_second_adapter_and_come_off_cleanly() -> None:
    params = ["experts.gate_up_proj", "experts.down_proj"]
    plain = build("zoo")
    model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=4, target_parameters=params, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_parameters=params, init_lora_weights=False))
    inner = model.get_base_model()
    assert [n for n, _ in adapter_layers(inner)] == ["experts", "experts.base_layer"]  # one chain, not two
    outputs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outputs[name] = output_of(model, ZOO)
    assert not torch.allclose(outputs["default"], outputs["other"])
    with pytest.raises(ValueError, match="same parameters"):
        model.add_adapter("third", LoraConfig(r=2, target_parameters=params[:1]))
    model.delete_adapter("other")
    model.set_adapter("default")
    assert torch.equal(output_of(model, ZOO), outputs["default"])
    model.delete_adapter("default")
    assert type(inner.experts).__name__ == "Experts"  # the chain is gone, inner layer first
    assert torch.equal(output_of(inner, ZOO), output_of(plain, ZOO))


def test_per_example_adapters_refused_where_the_update_is_on_weights() -> None:
    for where in ({"target_modules": ["attn"]}, {"target_parameters": ["experts.down_proj"]}):
        model = get_peft_model(build("zoo"), LoraConfig(r=4, **where))
        with pytest.raises(NotImplementedError, match="per-example adapters"):
            model(**ZOO, adapter_names=["default"] * 3)


def test_top_level_parameter_is_refused() -> None:
    with pytest.raises(TargetError, match="top-level module"):
        get_peft_model(Experts(8, 6), LoraConfig(target_parameters=["gate_up_proj"]))


@pytest.mark.parametrize("where", [{"target_modules": ["attn"]}, {"target_modules": ["gconv"]},
                                   {"target_parameters": ["experts.down_proj"]}], ids=["attention", "grouped", "parameter"])
def test_combining_refused_where_the_update_is_not_one_factor_pair(where: dict) -> None:
    model = get_peft_model(build("zoo"), LoraConfig(r=4, **where))
    model.add_adapter("other", LoraConfig(r=4, **where))
    with pytest.raises(ValueError, match="cannot be combined"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    assert sorted(model.peft_config) == ["default", "other"]
