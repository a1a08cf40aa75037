"""The public API around LoRA: several adapters, merging, combining, per-example adapters,
targeting, plain modules, gradient checkpointing and torch.compile."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from adapter_checks import assert_rounding_close, perturb, rounding_tolerance, weights_snapshot
from models import build, inputs_for, output_of
from peftkit import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peftkit.core.layer import adapter_layers
from peftkit.methods.lora import LoraLayer


def _lora(**kwargs) -> LoraConfig:
    return LoraConfig(**({"r": 4, "lora_alpha": 8, "init_lora_weights": False} | kwargs))


def _wrapped_names(model: nn.Module) -> list[str]:
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    return sorted(n for n, layer in adapter_layers(root) if isinstance(layer, LoraLayer))


def _two_adapters(kind: str = "bert", **kwargs) -> PeftModel:
    target = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "mlp": ["lin0", "lin1"]}[kind]
    model = get_peft_model(build(kind), _lora(target_modules=target, **kwargs))
    model.add_adapter("other", _lora(target_modules=target[:1], r=2, **kwargs))
    return model


# -- several adapters -----------------------------------------------------------------------
def test_add_set_delete_adapter() -> None:
    inputs = inputs_for("bert")
    base = output_of(build("bert"), inputs)
    model = get_peft_model(build("bert"), _lora(target_modules=["query", "value"]))
    first = output_of(model, inputs)
    assert not torch.allclose(first, base)

    model.add_adapter("other", _lora(target_modules=["key"], r=2))
    assert model.active_adapters == ["default"]
    assert torch.equal(output_of(model, inputs), first), "a new adapter must not be switched on"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)

    model.set_adapter("other")
    assert model.active_adapter == "other"
    second = output_of(model, inputs)
    assert not torch.allclose(second, first) and not torch.allclose(second, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)

    with pytest.raises(ValueError, match="no adapter named"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", _lora(target_modules=["key"]))

    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert model.active_adapters == ["default"]
    assert torch.equal(output_of(model, inputs), first)
    # the key layers carried only "other": they are plain nn.Linear again
    assert all(not n.endswith("key") for n in _wrapped_names(model))
    assert not any("other" in n for n, _ in model.named_parameters())


def test_set_adapter_with_two_active_adds_both() -> None:
    inputs = inputs_for("mlp")
    model = _two_adapters("mlp")
    perturb(model)
    base = output_of(build("mlp"), inputs)
    model.set_adapter(["default", "other"])
    both = output_of(model, inputs)
    model.set_adapter("default")
    model.merge_adapter()
    model.set_adapter(["default"])  # still merged: the same set is allowed
    merged_default = output_of(model, inputs)
    model.unmerge_adapter()
    model.set_adapter(["default", "other"])
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), both, atol=1e-6, rtol=1e-5)
    model.unmerge_adapter()
    assert not torch.allclose(both, merged_default) and not torch.allclose(both, base)


def test_disable_adapter_context_manager_also_when_merged() -> None:
    inputs = inputs_for("bert")
    base = output_of(build("bert"), inputs)
    model = get_peft_model(build("bert"), _lora(target_modules=["query", "value"], task_type="SEQ_CLS"))
    perturb(model)
    adapted = output_of(model, inputs)
    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), base)
    assert torch.equal(output_of(model, inputs), adapted)

    model.merge_adapter()
    merged_weights = weights_snapshot(model.get_base_model())
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, inputs), base, atol=1e-6, rtol=1e-5)
    after = weights_snapshot(model.get_base_model())
    assert after.keys() == merged_weights.keys()
    for k in after:  # merged again on exit: (W + Δ) − Δ + Δ, within two roundings of W + Δ
        assert_rounding_close(after[k], merged_weights[k], rounding_tolerance(2), msg=f"{k}: merged again on exit")
    assert all(layer.merged for _, layer in adapter_layers(model.get_base_model()) if isinstance(layer, LoraLayer))
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-6, rtol=1e-5)

    # an exception inside the block still restores the adapters
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-6, rtol=1e-5)


def test_merge_unmerge_merge_and_unload_unload() -> None:
    inputs = inputs_for("gpt2")
    plain = build("gpt2")
    original = weights_snapshot(plain)
    model = get_peft_model(build("gpt2"), _lora(target_modules=["c_attn", "c_proj"]))
    adapted = output_of(model, inputs)

    model.merge_adapter()
    assert all(layer.merged for _, layer in adapter_layers(model.get_base_model()))
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=1e-4)
    model.merge_adapter()  # merging twice is a no-op
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    assert not any(layer.merged for _, layer in adapter_layers(model.get_base_model()))

    unloaded = model.unload()
    assert type(unloaded) is type(plain) and not list(adapter_layers(unloaded))
    assert type(unloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    now = weights_snapshot(unloaded)
    assert now.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(now[key], original[key], atol=1e-6, rtol=0, msg=key)

    model = get_peft_model(build("gpt2"), _lora(target_modules=["c_attn", "c_proj"]))
    merged = model.merge_and_unload()
    assert not list(adapter_layers(merged))
    assert weights_snapshot(merged).keys() == original.keys()
    torch.testing.assert_close(output_of(merged, inputs), adapted, atol=1e-5, rtol=1e-4)


def test_merge_and_unload_keeps_trained_modules_to_save() -> None:
    inputs = inputs_for("bert")
    model = get_peft_model(build("bert"), _lora(target_modules=["query"], task_type="SEQ_CLS"))
    perturb(model)
    adapted = output_of(model, inputs)
    merged = model.merge_and_unload()
    assert isinstance(merged.classifier, nn.Linear)
    torch.testing.assert_close(output_of(merged, inputs), adapted, atol=1e-6, rtol=1e-5)


def test_trainable_parameter_counts(capsys) -> None:
    model = get_peft_model(build("mlp"), _lora(target_modules=["lin0", "lin1"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 4 * (16 + 32) + 4 * (32 + 32)
    assert total == sum(p.numel() for p in build("mlp").parameters()) + trainable
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    numbers = [int(x.replace(",", "")) for x in re.findall(r"[\d,]+(?=\s|$)", out.split("trainable%")[0])]
    assert numbers[:2] == [trainable, total]
    assert f"{100 * trainable / total:.4f}" in out


# -- combining adapters -------------------------------------------------------------------
def _deltas(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {n: layer.delta(name).detach() for n, layer in adapter_layers(model.get_base_model())
            if isinstance(layer, LoraLayer) and name in layer.adapter_names}


def _combined_model() -> PeftModel:
    model = get_peft_model(build("mlp"), _lora(target_modules=["lin0", "lin1"], r=4, lora_alpha=8))
    model.add_adapter("b", _lora(target_modules=["lin0", "lin1"], r=2, lora_alpha=3, use_rslora=True))
    return model


@pytest.mark.parametrize("combination", ["cat", "svd_full_rank"])
def test_add_weighted_adapter_exact(combination: str) -> None:
    model = _combined_model()
    weights = [0.7, -1.3]
    kwargs = {"combination_type": "cat"} if combination == "cat" else {"combination_type": "svd", "svd_rank": 32}
    model.add_weighted_adapter(["default", "b"], weights, "mix", **kwargs)
    assert model.active_adapters == ["default"], "the combination is not switched on by itself"
    da, db, mix = _deltas(model, "default"), _deltas(model, "b"), _deltas(model, "mix")
    assert mix.keys() == da.keys()
    for name in mix:
        torch.testing.assert_close(mix[name], weights[0] * da[name] + weights[1] * db[name], atol=1e-5, rtol=1e-5)
    if combination == "cat":
        assert {layer.r["mix"] for _, layer in adapter_layers(model.get_base_model())} == {6}
    # and it runs: the output is the base plus the weighted updates
    inputs = inputs_for("mlp")
    model.set_adapter("mix")
    expected = build("mlp")
    with torch.no_grad():
        for name in mix:
            expected.get_submodule(name).weight += weights[0] * da[name] + weights[1] * db[name]
    torch.testing.assert_close(output_of(model, inputs), output_of(expected, inputs), atol=1e-5, rtol=1e-5)


def test_add_weighted_adapter_svd_low_rank_is_best_approximation() -> None:
    model = _combined_model()
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="svd", svd_rank=3)
    da, db, mix = _deltas(model, "default"), _deltas(model, "b"), _deltas(model, "mix")
    for name in mix:
        target = da[name] + db[name]
        u, s, vh = torch.linalg.svd(target)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert torch.linalg.matrix_rank(mix[name]).item() <= 3
        torch.testing.assert_close(mix[name], best, atol=1e-5, rtol=1e-5)


def test_add_weighted_adapter_linear() -> None:
    model = get_peft_model(build("mlp"), _lora(target_modules=["lin0"], r=4, lora_alpha=8))
    model.add_adapter("b", _lora(target_modules=["lin0"], r=4, lora_alpha=4))
    layer = model.get_base_model().lin0
    # one adapter: exactly the weighted update
    model.add_weighted_adapter(["default"], [0.5], "halved", combination_type="linear")
    torch.testing.assert_close(layer.delta("halved"), 0.5 * layer.delta("default"), atol=1e-6, rtol=1e-5)
    # two: A and B are the weighted sums of the factors, c_i = sqrt(w_i * s_i)
    model.add_weighted_adapter(["default", "b"], [1.0, 2.0], "lin", combination_type="linear")
    c = [(1.0 * layer.scaling["default"]) ** 0.5, (2.0 * layer.scaling["b"]) ** 0.5]
    a = c[0] * layer.lora_A["default"].weight + c[1] * layer.lora_A["b"].weight
    b = c[0] * layer.lora_B["default"].weight + c[1] * layer.lora_B["b"].weight
    torch.testing.assert_close(layer.delta("lin"), (b @ a).detach(), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="equal rank"):
        model.add_adapter("r2", _lora(target_modules=["lin0"], r=2))
        model.add_weighted_adapter(["default", "r2"], [1.0, 1.0], "bad", combination_type="linear")
    assert "bad" not in model.peft_config


def test_add_weighted_adapter_with_names_that_are_suffixes_of_others(tmp_path) -> None:
    """``proj`` is a suffix of ``blocks.0.proj``: the combination adapts exactly the modules
    its sources adapt, with each module's own rank."""
    model = get_peft_model(Named(), _lora(target_modules=r"blocks\.0\.proj", r=4))
    model.add_adapter("b", _lora(target_modules=r"proj|blocks\.0\.proj", r=3))
    model.add_weighted_adapter(["default", "b"], [1.0, 2.0], "mix", combination_type="cat")
    layers = dict(adapter_layers(model.get_base_model()))
    assert sorted(n for n, layer in layers.items() if "mix" in layer.adapter_names) == ["blocks.0.proj", "proj"]
    assert (layers["blocks.0.proj"].r["mix"], layers["proj"].r["mix"]) == (7, 3)
    for name, layer in layers.items():
        expected = sum(w * layer.delta(a) for a, w in (("default", 1.0), ("b", 2.0)) if a in layer.adapter_names)
        torch.testing.assert_close(layer.delta("mix"), expected, atol=1e-6, rtol=1e-5, msg=name)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    x = torch.randn(2, 4)
    model.set_adapter("mix")
    expected_out = model.get_base_model().proj(x), model.get_base_model().blocks[0]["proj"](x)
    reloaded = PeftModel.from_pretrained(Named(), tmp_path / "mix", adapter_name="mix")
    assert sorted(_wrapped_names(reloaded)) == ["blocks.0.proj", "proj"]
    reloaded_base = reloaded.get_base_model()
    base = model.get_base_model()
    with torch.no_grad():  # same base weights as the model the adapter was made on
        for name in ("proj", "blocks.0.proj"):
            reloaded_base.get_submodule(name).base_layer.load_state_dict(base.get_submodule(name).base_layer.state_dict())
    got = reloaded_base.proj(x), reloaded_base.blocks[0]["proj"](x)
    for g, e in zip(got, expected_out, strict=True):
        assert torch.equal(g, e)


def test_weighted_adapter_saves_and_reloads(tmp_path) -> None:
    model = _combined_model()
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    inputs = inputs_for("mlp")
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    reloaded = PeftModel.from_pretrained(build("mlp"), tmp_path / "mix", adapter_name="mix")
    assert torch.equal(output_of(reloaded, inputs), expected)


# -- per-example adapters ------------------------------------------------------------------
def test_forward_with_adapter_names_per_example() -> None:
    model = _two_adapters("bert", task_type="SEQ_CLS")
    perturb(model)
    model.set_adapter("other")
    perturb(model, seed=5)
    model.set_adapter("default")
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(1, 100, (5, 7), generator=g), "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    names = ["other", "__base__", "default", "other", "__base__"]
    mixed = model(**inputs, adapter_names=names).logits
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = output_of(model, inputs)
    with model.disable_adapter():
        alone["__base__"] = output_of(model, inputs)
    assert not torch.allclose(alone["default"], alone["other"])
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-6, rtol=1e-5, msg=f"row {i} ({name})")
    with pytest.raises(ValueError, match="unknown adapters"):
        model(**inputs, adapter_names=["nope"] * 5)
    with pytest.raises(ValueError, match="5 examples"):
        model(**inputs, adapter_names=["default"] * 4)


def test_generate_with_adapter_names_per_example() -> None:
    model = _two_adapters("llama")
    model.set_adapter("other")
    perturb(model, seed=5, scale=1.0)
    model.set_adapter("default")
    perturb(model, seed=6, scale=1.0)
    ids = torch.randint(1, 100, (3, 4), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    names = ["other", "__base__", "default"]
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = model.generate(input_ids=ids, **kwargs)
    with model.disable_adapter():
        alone["__base__"] = model.generate(input_ids=ids, **kwargs)
    assert len({tuple(alone[n].flatten().tolist()) for n in alone}) == 3, "the adapters should differ"
    for i, name in enumerate(names):
        assert torch.equal(mixed[i], alone[name][i]), name


def test_attribute_access_and_generate_pass_through() -> None:
    base = build("gpt2")
    model = get_peft_model(base, _lora(target_modules=["c_attn"]))
    assert model.config is base.config
    assert model.get_input_embeddings() is base.transformer.wte
    assert model.get_base_model() is base
    assert model.transformer is base.transformer
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6) and torch.equal(out[:, :3], ids)
    with pytest.raises(AttributeError):
        _ = model.no_such_attribute


# -- plain modules ---------------------------------------------------------------------------
def test_inject_adapter_in_plain_module_and_state_dict_round_trip() -> None:
    inputs = inputs_for("mlp")
    config = _lora(target_modules=["lin0", "emb"])
    model = inject_adapter_in_model(config, build("mlp"))
    perturb(model)
    assert isinstance(model.lin0, LoraLayer) and isinstance(model.emb, LoraLayer)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "lin0.lora_A.default.weight", "lin0.lora_B.default.weight",
        "emb.lora_embedding_A.default", "emb.lora_embedding_B.default",
    }
    state = get_peft_model_state_dict(model)
    assert sorted(state) == ["emb.lora_embedding_A", "emb.lora_embedding_B", "lin0.lora_A.weight", "lin0.lora_B.weight"]
    other = inject_adapter_in_model(config, build("mlp"))
    assert not torch.equal(output_of(other, inputs), output_of(model, inputs))
    set_peft_model_state_dict(other, state)
    assert torch.equal(output_of(other, inputs), output_of(model, inputs))


def test_plain_module_state_dict_matches_peft_keys() -> None:
    peft = pytest.importorskip("peft")
    config = {"r": 2, "target_modules": ["lin0", "lin1"]}
    ours = get_peft_model_state_dict(inject_adapter_in_model(LoraConfig(**config), build("mlp")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model_state_dict(peft.inject_adapter_in_model(peft.LoraConfig(**config), build("mlp")))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# -- target selection --------------------------------------------------------------------------
class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(4, 4), "out_proj": nn.Linear(4, 4)}) for _ in range(3))
        self.proj = nn.Linear(4, 4)


def _targets(model: nn.Module, **kwargs) -> list[str]:
    return _wrapped_names(get_peft_model(model, LoraConfig(r=2, **kwargs)))


def test_list_targets_match_dot_suffixes() -> None:
    assert _targets(Named(), target_modules=["proj"]) == ["blocks.0.proj", "blocks.1.proj", "blocks.2.proj", "proj"]
    assert _targets(Named(), target_modules=["1.out_proj"]) == ["blocks.1.out_proj"]


def test_regex_targets_match_the_full_name() -> None:
    assert _targets(Named(), target_modules=r"blocks\.[02]\..*proj") == [
        "blocks.0.out_proj", "blocks.0.proj", "blocks.2.out_proj", "blocks.2.proj"]
    # a regex must match the whole name, not a part of it
    assert _targets(Named(), target_modules=r"proj") == ["proj"]


def test_all_linear_excludes_output_head() -> None:
    gpt2 = _targets(build("gpt2"), target_modules="all-linear")
    assert gpt2 and not any("lm_head" in n for n in gpt2)
    assert {n.rsplit(".", 1)[-1] for n in gpt2} == {"c_attn", "c_proj", "c_fc"}
    llama = _targets(build("llama"), target_modules="all-linear")
    assert len(llama) == 2 * 7 and "lm_head" not in llama
    bert = _targets(build("bert"), target_modules="all-linear", task_type="SEQ_CLS")
    assert "classifier" not in bert and "bert.pooler.dense" in bert
    # A plain nn.Module has no declared output head: as in PEFT, every linear layer is a target.
    assert "head" in _targets(build("mlp"), target_modules="all-linear")


def test_all_linear_second_adapter_finds_the_wrapped_layers() -> None:
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules="all-linear"))
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear"))
    first = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    second = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "second" in m.lora_A}
    assert len(first) == 2 * 7 and second == first


def test_exclude_modules() -> None:
    names = _targets(build("gpt2"), target_modules="all-linear", exclude_modules=["c_proj"])
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_fc"}
    names = _targets(build("llama"), target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*")
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_layers_to_transform_and_layers_pattern() -> None:
    names = _targets(build("llama"), target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    names = _targets(build("bert"), target_modules=["query"], layers_to_transform=0, layers_pattern="layer")
    assert names == ["bert.encoder.layer.0.attention.self.query"]
    names = _targets(Named(), target_modules=["proj"], layers_to_transform=[2], layers_pattern="blocks")
    assert names == ["blocks.2.proj"]


def test_rank_and_alpha_patterns() -> None:
    model = get_peft_model(build("llama"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, r"layers\.1\..*v_proj": 6}, alpha_pattern={"v_proj": 3}))
    layers = dict(adapter_layers(model.get_base_model()))
    expected = {  # name: (r, scaling)
        "model.layers.0.self_attn.q_proj": (2, 8 / 2),
        "model.layers.0.self_attn.v_proj": (4, 3 / 4),
        "model.layers.1.self_attn.q_proj": (4, 8 / 4),
        "model.layers.1.self_attn.v_proj": (6, 3 / 6),
    }
    for name, (r, scaling) in expected.items():
        layer = layers[name]
        assert layer.lora_A["default"].weight.shape[0] == r == layer.r["default"]
        assert layer.scaling["default"] == pytest.approx(scaling)


# -- training machinery ------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "reentrant", "enable_after_wrapping"), [
    ("llama", True, False), ("llama", False, False), ("vit", True, False), ("vit", True, True)])
def test_gradient_checkpointing_reaches_lora(kind: str, reentrant: bool, enable_after_wrapping: bool) -> None:
    """With a frozen base, reentrant checkpointing only back-propagates into a block when its
    input requires grad: the wrapper must arrange that (ViT's input is pixels, not ids)."""
    base = build(kind)
    gc_kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if not enable_after_wrapping:
        base.gradient_checkpointing_enable(**gc_kwargs)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if enable_after_wrapping:
        model.gradient_checkpointing_enable(**gc_kwargs)
    model.train()
    assert base.is_gradient_checkpointing
    out = model(**inputs_for(kind, batch=2))
    out.logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 2 * 2
    for name, grad in grads.items():
        assert grad is not None, f"no gradient reached {name}"
        if "lora_B" in name:
            assert grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_torch_compile_gives_same_output() -> None:
    inputs = inputs_for("mlp")
    model = get_peft_model(build("mlp"), _lora(target_modules=["lin0", "lin1", "emb"]))
    expected = output_of(model, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(output_of(compiled, inputs), expected, atol=1e-6, rtol=1e-6)


def test_from_pretrained_is_frozen_unless_trainable(tmp_path) -> None:
    model = get_peft_model(build("mlp"), _lora(target_modules=["lin0"], modules_to_save=["head"]))
    n_trainable = model.get_nb_trainable_parameters()[0]
    model.save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path)
    assert saved.inference_mode is True
    frozen = PeftModel.from_pretrained(build("mlp"), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    trainable = PeftModel.from_pretrained(build("mlp"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == n_trainable


def test_lora_dropout_only_in_training() -> None:
    inputs = inputs_for("mlp")
    model = get_peft_model(build("mlp"), _lora(target_modules=["lin0", "lin1"], lora_dropout=0.5))
    reference = get_peft_model(build("mlp"), _lora(target_modules=["lin0", "lin1"]))
    reference.load_state_dict(model.state_dict())
    assert torch.equal(output_of(model, inputs), output_of(reference, inputs))
    model.add_adapter("other", _lora(target_modules=["lin0", "emb"], lora_dropout=0.5))  # extends lin0
    model.set_adapter("other")
    assert torch.equal(output_of(model, inputs), output_of(model, inputs)), "eval mode: no dropout"
    model.set_adapter("default")
    model.train()
    torch.manual_seed(0)
    first = output_of(model, inputs)
    second = output_of(model, inputs)
    assert not torch.equal(first, second)
