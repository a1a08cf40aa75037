"""Adapter files move both ways between peftkit and Hugging Face PEFT: the same tensors, and
the same outputs within float32 rounding."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from adapter_checks import INTEROP_REL, assert_rounding_close, perturb
from models import build, inputs_for, output_of
from peftkit import LoraConfig, PeftConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")

# name -> (model kind, LoraConfig keyword arguments valid for both libraries)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("bert", {"target_modules": ["query", "value"]}),
    "rslora": ("llama", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "lora_alpha": 16}),
    "dora": ("bert", {"target_modules": ["query", "dense"], "use_dora": True}),
    "embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "modules_to_save": ("bert", {"target_modules": ["query"], "task_type": "SEQ_CLS"}),
    "modules_to_save_explicit": ("mlp", {"target_modules": ["lin0"], "modules_to_save": ["head"]}),
    "rank_pattern": (
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "rank_pattern": {"h.0.attn.c_attn": 2, "c_fc": 6},
         "alpha_pattern": {"h.1.attn.c_attn": 3}},
    ),
    "bias_lora_only": ("mlp", {"target_modules": ["lin0", "lin1"], "bias": "lora_only"}),
    "bias_all": ("mlp", {"target_modules": ["lin0"], "bias": "all"}),
    "conv": ("cnn", {"target_modules": ["conv1", "conv2", "conv1d"]}),
    "conv_dora": ("cnn", {"target_modules": ["conv1", "conv1d"], "use_dora": True}),
    "gpt2_dora": ("gpt2", {"target_modules": ["c_attn"], "use_dora": True}),
    "conv_grouped": ("zoo", {"target_modules": ["dwconv", "gconv"]}),  # depth-wise and grouped
    "embedding_dora": ("mlp", {"target_modules": ["emb", "lin0"], "use_dora": True}),
    "target_parameters": ("zoo", {"target_modules": [], "target_parameters": [
        "experts.gate_up_proj", "experts.down_proj", "experts_t.gate_up_proj"]}),  # nested; one stored transposed
}


def _kwargs(case: str) -> dict[str, Any]:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False} | CASES[case][1]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about embeddings, fan_in_fan_out...
        return fn(*args, **kwargs)


def _assert_same_outputs(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert_rounding_close(ours, theirs, INTEROP_REL)


def _peft_model(kind: str, kwargs: dict[str, Any]):
    return _quiet(peft.get_peft_model, build(kind), peft.LoraConfig(**kwargs))


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_file_loads_in_peft(case: str, tmp_path) -> None:
    kind, _ = CASES[case]
    inputs = inputs_for(kind)
    model = get_peft_model(build(kind), LoraConfig(**_kwargs(case)))
    perturb(model)  # DoRA magnitudes, saved heads and biases differ from their start too
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, build(kind), tmp_path)
    _assert_same_outputs(output_of(theirs, inputs), expected)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_peftkit(case: str, tmp_path) -> None:
    kind, _ = CASES[case]
    inputs = inputs_for(kind)
    theirs = _peft_model(kind, _kwargs(case))
    perturb(theirs)
    expected = output_of(theirs, inputs)
    _quiet(theirs.save_pretrained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = PeftModel.from_pretrained(build(kind), tmp_path)
    _assert_same_outputs(output_of(ours, inputs), expected)
    # saved again, it is the same file: same tensors under the same keys (PEFT also stores
    # the embedding matrix beside an embedding LoRA; that base tensor is not the adapter's)
    ours.save_pretrained(tmp_path / "again")
    theirs_file = load_file(tmp_path / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "again" / "adapter_model.safetensors")
    base_copies = {k for k in theirs_file if k.endswith("base_layer.weight")}
    assert ours_file.keys() == theirs_file.keys() - base_copies
    for key, value in ours_file.items():
        assert torch.equal(value, theirs_file[key]), key


def _two_adapters_theirs(kind: str):
    model = _peft_model(kind, _kwargs("plain"))
    _quiet(model.add_adapter, "other", peft.LoraConfig(**(_kwargs("plain") | {"r": 2, "target_modules": ["key"]})))
    for name in ("default", "other"):
        model.set_adapter(name)
        perturb(model, seed=len(name))
    return model


def _two_adapters_ours(kind: str):
    model = get_peft_model(build(kind), LoraConfig(**_kwargs("plain")))
    model.add_adapter("other", LoraConfig(**(_kwargs("plain") | {"r": 2, "target_modules": ["key"]})))
    for name in ("default", "other"):
        model.set_adapter(name)
        perturb(model, seed=len(name))
    return model


def _outputs_per_adapter(model, inputs) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        out[name] = output_of(model, inputs)
    return out


def test_second_adapter_peft_to_peftkit(tmp_path) -> None:
    inputs = inputs_for("bert")
    theirs = _two_adapters_theirs("bert")
    expected = _outputs_per_adapter(theirs, inputs)
    assert not torch.equal(expected["default"], expected["other"])
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    ours = PeftModel.from_pretrained(build("bert"), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    got = _outputs_per_adapter(ours, inputs)
    for name in expected:
        _assert_same_outputs(got[name], expected[name])
    alone = PeftModel.from_pretrained(build("bert"), tmp_path, subfolder="other", adapter_name="other")
    assert alone.active_adapters == ["other"]
    _assert_same_outputs(output_of(alone, inputs), expected["other"])


def test_second_adapter_peftkit_to_peft(tmp_path) -> None:
    inputs = inputs_for("bert")
    ours = _two_adapters_ours("bert")
    expected = _outputs_per_adapter(ours, inputs)
    assert not torch.equal(expected["default"], expected["other"])
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    theirs = _quiet(peft.PeftModel.from_pretrained, build("bert"), tmp_path)
    _quiet(theirs.load_adapter, tmp_path / "other", "other")
    got = _outputs_per_adapter(theirs, inputs)
    for name in expected:
        _assert_same_outputs(got[name], expected[name])
    # PEFT's own subfolder argument finds the same adapter
    again = _quiet(peft.PeftModel.from_pretrained, build("bert"), tmp_path, subfolder="other", adapter_name="other")
    _assert_same_outputs(output_of(again, inputs), expected["other"])


def test_peft_config_file_loads_without_warning(tmp_path) -> None:
    """PEFT writes many keys peftkit does not know (with default values): no warning, and
    every shared field keeps its value."""
    theirs = _peft_model("gpt2", _kwargs("rank_pattern") | {"lora_dropout": 0.1, "layers_to_transform": [1],
                                                          "layers_pattern": "h", "exclude_modules": ["c_proj"]})
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoraConfig)
    ours = config.to_dict()
    shared = set(ours) & set(written)
    assert {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
            "layers_pattern", "exclude_modules", "fan_in_fan_out", "lora_dropout", "use_dora"} <= shared
    for key in shared:
        value = ours[key]
        assert value == written[key] or sorted(value) == sorted(written[key]), key


def test_peftkit_config_file_reads_in_peft(tmp_path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], rank_pattern={"layer.0.attention.self.query": 2},
                        use_rslora=True, bias="lora_only", task_type="SEQ_CLS")
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.LoraConfig.from_pretrained(tmp_path)
    for key, value in config.to_dict().items():
        theirs_value = getattr(theirs, key)
        if isinstance(theirs_value, set):
            theirs_value = sorted(theirs_value)
        assert theirs_value == value or str(theirs_value) == str(value), key


def test_unknown_key_from_newer_writer_warns(tmp_path) -> None:
    data = LoraConfig(target_modules=["q"]).to_dict() | {"some_future_option": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_option"):
        config = PeftConfig.from_pretrained(tmp_path)
    assert config.target_modules == ["q"]
