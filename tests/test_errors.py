"""Bad input gives an error that names the problem, and leaves the model as it was."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from torch import nn

from adapter_checks import perturb
from models import build, inputs_for, output_of
from peftkit import (
    AdapterStateError,
    LoraConfig,
    PeftConfig,
    PeftModel,
    TargetError,
    get_peft_model,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must not change: module tree, tensors, trainable flags."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": sorted(k for k in vars(model) if k.startswith("_peftkit")),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = fingerprint(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["attrs"] == before["attrs"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


# -- targeting -----------------------------------------------------------------------------
def test_targets_matching_nothing_name_the_closest_modules() -> None:
    model = build("bert")
    before = fingerprint(model)
    with pytest.raises(TargetError) as err:
        get_peft_model(model, LoraConfig(target_modules=["qurey", "vaule"]))
    message = str(err.value)
    assert "matched no module" in message and "'query'" in message and "'value'" in message
    assert_unchanged(model, before)


def test_partly_matching_targets_warn_with_close_names() -> None:
    model = build("bert")
    with pytest.warns(UserWarning, match=r"(?s)\['vaule'\].*'value'"):
        peft_model = get_peft_model(model, LoraConfig(target_modules=["query", "vaule"]))
    assert peft_model.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize(
    ("target", "type_name"), [(["attention"], "BertAttention"), (r".*LayerNorm", "LayerNorm")]
)
def test_unsupported_module_type_names_type_and_supported(target, type_name: str) -> None:
    model = build("bert")
    before = fingerprint(model)
    with pytest.raises(TargetError) as err:
        get_peft_model(model, LoraConfig(target_modules=target))
    message = str(err.value)
    assert type_name in message and "nn.Linear" in message and "nn.Embedding" in message and "Conv1D" in message
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"target_modules": ["lin0"], "target_parameters": ["lin1.weight"], "lora_dropout": 0.1},
         "target_parameters.*lora_dropout"),
        ({"target_modules": ["lin0", "emb"], "init_lora_weights": "pissa"}, "pissa.*Embedding"),
        ({"target_modules": ["lin0", "lin1"], "modules_to_save": ["nope"]}, r"modules_to_save \['nope'\]"),
        ({"target_modules": "lin[", "r": 2}, "not a valid regular expression"),
        ({"target_modules": ["lin0"], "fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
    ids=["dropout_on_parameter", "pissa_on_embedding", "missing_module_to_save", "bad_regex", "fan_in_fan_out_on_linear"],
)
def test_refused_config_leaves_model_unchanged(config: dict[str, Any], match: str) -> None:
    model = build("mlp")
    before = fingerprint(model)
    with pytest.raises((ValueError, TypeError), match=match):
        get_peft_model(model, LoraConfig(**config))
    assert_unchanged(model, before)


def test_refused_second_adapter_leaves_model_unchanged() -> None:
    model = get_peft_model(build("mlp"), LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False))
    before = fingerprint(model)
    for config in (
        LoraConfig(target_modules=["lin0"], target_parameters=["head.weight"], lora_dropout=0.1),
        LoraConfig(target_modules=["lin1", "emb"], init_lora_weights="pissa"),
        LoraConfig(target_modules=["nothing"]),
    ):
        with pytest.raises(ValueError):
            model.add_adapter("second", config)
        assert_unchanged(model, before)
        assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match=r"torch\.nn\.Module attribute"):
        model.add_adapter("half", LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter("__base__", LoraConfig(target_modules=["lin0"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("config", "match"),
    [({"init_lora_weights": "pissa"}, "pissa"), ({"use_dora": True}, "use_dora")],
    ids=["pissa", "dora"],
)
def test_refusal_after_a_supported_layer_leaves_it_unchanged(config: dict[str, Any], match: str) -> None:
    """The linear layer comes first and is fine (PiSSA rewrites its weight); the grouped
    convolution after it is refused: the linear weight must be as it was."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(4, 4, 3, groups=2))
    before = fingerprint(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LoraConfig(target_modules=["0", "1"], **config))
    assert_unchanged(model, before)
    wrapped = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(4, 4, 3, groups=2)), LoraConfig(target_modules=["1"]))
    with pytest.raises(ValueError, match=match):
        wrapped.add_adapter("second", LoraConfig(target_modules=["0", "1"], **config))
    assert list(wrapped.peft_config) == ["default"]


def test_inject_in_plain_module_refused_leaves_it_unchanged() -> None:
    model = build("cnn")
    before = fingerprint(model)
    with pytest.raises(ValueError, match="pissa"):
        inject_adapter_in_model(LoraConfig(target_modules=["head", "conv1"], init_lora_weights="pissa"), model)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in"),
        ({"bias": "some"}, "bias must be"),
        ({"init_lora_weights": "olora2"}, "init_lora_weights must be one of"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]"),
        ({"task_type": "SEQ_CLASSIFICATION"}, "task_type"),
        ({"target_modules": 3}, "target_modules must be"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        LoraConfig(**({"target_modules": ["q"]} | kwargs))


# -- loading ---------------------------------------------------------------------------------
def _saved(tmp_path, kind: str = "bert", **kwargs) -> str:
    config = LoraConfig(**({"r": 4, "target_modules": ["query", "value"], "init_lora_weights": False} | kwargs))
    model = get_peft_model(build(kind), config)
    perturb(model)
    model.save_pretrained(tmp_path)
    return os.fspath(tmp_path)


def test_truncated_safetensors_is_refused_and_model_unchanged(tmp_path) -> None:
    path = _saved(tmp_path)
    weights = os.path.join(path, "adapter_model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as fh:
        fh.write(data[: len(data) // 2])
    model = build("bert")
    before = fingerprint(model)
    with pytest.raises(ValueError, match="truncated"):
        PeftModel.from_pretrained(model, path)
    assert_unchanged(model, before)


def test_truncated_config_is_refused(tmp_path) -> None:
    path = _saved(tmp_path)
    config_path = os.path.join(path, "adapter_config.json")
    text = open(config_path).read()
    with open(config_path, "w") as fh:
        fh.write(text[: len(text) // 2])
    model = build("bert")
    before = fingerprint(model)
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftModel.from_pretrained(model, path)
    assert_unchanged(model, before)


def test_adapter_of_other_rank_names_key_and_shapes(tmp_path) -> None:
    path = _saved(tmp_path, r=4)
    # the config now claims r=8: the tensors no longer fit
    config_path = os.path.join(path, "adapter_config.json")
    data = json.loads(open(config_path).read()) | {"r": 8}
    open(config_path, "w").write(json.dumps(data))
    model = build("bert")
    before = fingerprint(model)
    with pytest.raises(AdapterStateError) as err:
        PeftModel.from_pretrained(model, path)
    message = str(err.value)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in message
    assert "(4, 32)" in message and "(8, 32)" in message
    assert_unchanged(model, before)


def test_adapter_of_other_model_names_key_and_shapes(tmp_path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    path = _saved(tmp_path)
    torch.manual_seed(0)
    wider = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=37,
                                                     max_position_embeddings=64)).eval()
    before = fingerprint(wider)
    with pytest.raises(AdapterStateError) as err:
        PeftModel.from_pretrained(wider, path)
    message = str(err.value)
    assert ".lora_" in message and "(4, 32)" in message and "(4, 48)" in message
    assert_unchanged(wider, before)


def test_adapter_for_other_targets_is_refused(tmp_path) -> None:
    path = _saved(tmp_path)
    model = build("bert")
    before = fingerprint(model)
    # the file holds query/value tensors, the config passed in says key/value
    with pytest.raises(AdapterStateError, match=r"query\.lora_A\.weight"):
        PeftModel.from_pretrained(model, path, config=LoraConfig(r=4, target_modules=["key", "value"]))
    assert_unchanged(model, before)


def test_failed_load_adapter_keeps_peft_model(tmp_path) -> None:
    path = _saved(tmp_path / "a", r=4)
    config_path = os.path.join(path, "adapter_config.json")
    data = json.loads(open(config_path).read()) | {"r": 2}
    open(config_path, "w").write(json.dumps(data))
    model = get_peft_model(build("bert"), LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))
    inputs = inputs_for("bert")
    expected = output_of(model, inputs)
    before = fingerprint(model)
    with pytest.raises(AdapterStateError, match=r"\(4, 32\).*\(2, 32\)"):
        model.load_adapter(path, "other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert torch.equal(output_of(model, inputs), expected)


def test_state_dict_with_missing_or_unexpected_keys(tmp_path) -> None:
    model = get_peft_model(build("mlp"), LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    state = {k.replace(".default", ""): v for k, v in state.items()}
    before = fingerprint(model)
    missing = {k: v for k, v in state.items() if "lin1" not in k}
    with pytest.raises(AdapterStateError, match=r"lacks base_model\.model\.lin1\.lora_A\.weight"):
        set_peft_model_state_dict(model, missing)
    unexpected = state | {"base_model.model.lin2.lora_A.weight": torch.zeros(2, 32)}
    with pytest.raises(AdapterStateError, match=r"unexpected key 'base_model\.model\.lin2\.lora_A\.weight'.*closest"):
        set_peft_model_state_dict(model, unexpected)
    assert_unchanged(model, before)


def test_missing_folder_and_unknown_method(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(build("mlp"), tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORAX", "r": 2}))
    with pytest.raises(ValueError, match="did you mean LORA"):
        PeftConfig.from_pretrained(tmp_path)
