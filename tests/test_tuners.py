"""LoHa, LoKr, VeRA, OFT and AdaLoRA: files move both ways with Hugging Face PEFT (the same
outputs within float32 rounding), AdaLoRA's schedule and regulariser against PEFT's and
through ``peftkit train``, and the errors for what they do not adapt.

The invariants (identity at init, merge, unmerge, save/load, disable, ...) are rows of
``tests/invariant_cases.py``.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from adapter_checks import INTEROP_REL, MODEL_REL, assert_rounding_close, perturb
from models import build, inputs_for, output_of
from peftkit import (
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    OFTConfig,
    PeftModel,
    TargetError,
    VeraConfig,
    get_peft_model,
)
from peftkit.core.layer import AdapterLayer
from peftkit.methods.adalora import RankSchedule
from peftkit.methods.adalora.schedule import OrthogonalRegulariser, _layers

peft = pytest.importorskip("peft")

OURS = {"LOHA": LoHaConfig, "LOKR": LoKrConfig, "VERA": VeraConfig, "OFT": OFTConfig, "ADALORA": AdaLoraConfig}
# the option that makes PEFT start every factor away from zero (so its file changes the output)
RANDOM_INIT = {"LOHA": "init_weights", "LOKR": "init_weights", "VERA": "init_weights", "OFT": "init_weights",
               "ADALORA": "init_lora_weights"}

# name -> (method, model kind, keyword arguments valid for both libraries)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "loha_linear": ("LOHA", "mlp", {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 4}),
    "loha_conv": ("LOHA", "cnn", {"target_modules": ["conv1", "conv2"], "r": 2}),
    "loha_conv_tucker": ("LOHA", "cnn", {"target_modules": ["conv1", "conv2"], "r": 2, "use_effective_conv2d": True}),
    "loha_patterns": ("LOHA", "bert", {"target_modules": ["query", "value"], "r": 2, "rank_pattern": {"value": 4},
                                       "alpha_pattern": {"layer.0.attention.self.query": 3}}),
    "lokr_linear": ("LOKR", "mlp", {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 4}),
    "lokr_decompose_both": ("LOKR", "llama", {"target_modules": ["q_proj", "down_proj"], "r": 1, "decompose_both": True}),
    "lokr_factor": ("LOKR", "bert", {"target_modules": ["query", "value"], "r": 2, "decompose_factor": 4}),
    "lokr_conv": ("LOKR", "cnn", {"target_modules": ["conv1", "conv2"], "r": 2}),
    "lokr_conv_tucker": ("LOKR", "cnn", {"target_modules": ["conv1", "conv2"], "r": 1, "use_effective_conv2d": True}),
    "vera": ("VERA", "bert", {"target_modules": ["query", "value", "intermediate.dense"], "r": 8}),
    "vera_from_seed": ("VERA", "mlp", {"target_modules": ["lin0", "lin1"], "r": 4, "save_projection": False,
                                       "projection_prng_key": 3}),
    "oft": ("OFT", "bert", {"target_modules": ["query", "value"], "r": 0, "oft_block_size": 8}),
    "oft_exact_cayley_shared": ("OFT", "llama", {"target_modules": ["q_proj"], "r": 4, "oft_block_size": 0,
                                                 "block_share": True, "use_cayley_neumann": False}),
    "oft_three_terms": ("OFT", "mlp", {"target_modules": ["lin0", "lin1"], "r": 0, "oft_block_size": 4,
                                       "num_cayley_neumann_terms": 3}),
    "adalora": ("ADALORA", "bert", {"target_modules": ["query", "value"], "init_r": 4, "target_r": 2, "total_step": 10}),
}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes (OFT's Cayley-Neumann version note, VeRA's seed note, ...)
        return fn(*args, **kwargs)


def _theirs_config(method: str, kwargs: dict[str, Any]):
    cls = {"LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig, "VERA": peft.VeraConfig, "OFT": peft.OFTConfig,
           "ADALORA": peft.AdaLoraConfig}[method]
    return _quiet(cls, **kwargs)


def _assert_changes_output(out: torch.Tensor, kind: str) -> None:
    base = output_of(build(kind), inputs_for(kind))
    assert (out - base).abs().max() > 10 * MODEL_REL * base.abs().max(), "the adapter has no effect"


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_file_loads_in_peft(case: str, tmp_path) -> None:
    method, kind, kwargs = CASES[case]
    inputs = inputs_for(kind)
    model = get_peft_model(build(kind), OURS[method](**kwargs))
    perturb(model, scale=0.5)
    expected = output_of(model, inputs)
    _assert_changes_output(expected, kind)
    model.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, build(kind), tmp_path)
    assert type(theirs.peft_config["default"]).__name__ == type(model.peft_config["default"]).__name__
    assert_rounding_close(output_of(theirs, inputs), expected, INTEROP_REL)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_peftkit(case: str, tmp_path) -> None:
    method, kind, kwargs = CASES[case]
    inputs = inputs_for(kind)
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, build(kind), _theirs_config(method, kwargs | {RANDOM_INIT[method]: False}))
    expected = output_of(theirs, inputs)
    _assert_changes_output(expected, kind)
    _quiet(theirs.save_pretrained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known or silently ignored
        ours = PeftModel.from_pretrained(build(kind), tmp_path)
    assert type(ours.peft_config["default"]) is OURS[method]
    assert_rounding_close(output_of(ours, inputs), expected, INTEROP_REL)
    # saved again: the same tensors under the same keys
    ours.save_pretrained(tmp_path / "again")
    theirs_file = load_file(tmp_path / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert ours_file.keys() == theirs_file.keys()
    for key, value in ours_file.items():
        assert torch.equal(value, theirs_file[key]), key


def test_vera_projections_are_those_peft_draws_from_the_seed(tmp_path) -> None:
    """Without a saved projection both libraries draw the same A and B from the seed."""
    kwargs = {"target_modules": ["lin0", "lin1"], "r": 4, "projection_prng_key": 11}
    ours = get_peft_model(build("mlp"), VeraConfig(**kwargs))
    ours.save_pretrained(tmp_path)
    mine = load_file(tmp_path / "adapter_model.safetensors")
    theirs = _quiet(peft.get_peft_model, build("mlp"), _theirs_config("VERA", kwargs))
    _quiet(theirs.save_pretrained, tmp_path / "theirs")
    drawn = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert mine["base_model.vera_A"].shape == (4, 32) and mine["base_model.vera_B"].shape == (32, 4)
    for key in ("base_model.vera_A", "base_model.vera_B"):
        assert torch.equal(mine[key], drawn[key]), key  # the same draws from the same generator
    # every layer slices the one shared pair
    projections = {id(layer.vera_projections) for layer in (ours.base_model.model.lin0, ours.base_model.model.lin1)}
    assert len(projections) == 1
    holder = ours.base_model.model.lin0.vera_projections
    ours.add_adapter("other", VeraConfig(**kwargs))
    assert holder.has("other") and ours.base_model.model.lin1.vera_projections is holder
    ours.delete_adapter("other")
    assert not holder.has("other") and holder.has("default")


# -- AdaLoRA: the schedule against PEFT's, the regulariser, peftkit train --------------------------
ADA = {"target_modules": ["query", "value"], "init_r": 4, "target_r": 2, "total_step": 12, "tinit": 2, "tfinal": 3,
       "deltaT": 2, "lora_alpha": 8, "orth_reg_weight": 0.0}


def _mse_steps(model, steps: int, after_step) -> None:
    inputs = inputs_for("bert")
    target = torch.randn(output_of(model, inputs).shape, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    # in eval mode: BERT's dropout would draw different masks in the two libraries
    for step in range(1, steps + 1):
        out = model(**inputs)
        torch.nn.functional.mse_loss(out.logits, target).backward()
        opt.step()
        after_step(step)
        opt.zero_grad()


def test_adalora_schedule_prunes_the_triplets_peft_prunes(tmp_path) -> None:
    """The same start, data and optimiser: PEFT's allocator and peftkit's schedule keep the
    same triplets, and the cut adapters give the same outputs."""
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, build("bert"), _theirs_config("ADALORA", ADA | {"init_lora_weights": False}))
    _quiet(theirs.save_pretrained, tmp_path / "start")
    ours = PeftModel.from_pretrained(build("bert"), tmp_path / "start", is_trainable=True)
    _mse_steps(theirs, ADA["total_step"], lambda s: theirs.base_model.update_and_allocate(s))
    schedule = RankSchedule(ours, ours.peft_config["default"])
    _mse_steps(ours, ADA["total_step"], schedule.step)
    ranks = schedule.finalize()
    assert sum(ranks.values()) == ADA["target_r"] * 4
    theirs_pattern = {k: v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    theirs_pattern = {k.replace(".default", ""): v for k, v in theirs_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == theirs_pattern
    # trained through two computations of the same steps: close, not equal
    inputs = inputs_for("bert")
    assert_rounding_close(output_of(ours, inputs), output_of(theirs, inputs), 1e-4)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == theirs_pattern
    reread = _quiet(peft.PeftModel.from_pretrained, build("bert"), tmp_path / "ours")
    assert_rounding_close(output_of(reread, inputs), output_of(ours, inputs), INTEROP_REL)
    # and PEFT's trained, cut file loads here
    _quiet(theirs.save_pretrained, tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftModel.from_pretrained(build("bert"), tmp_path / "theirs")
    assert_rounding_close(output_of(loaded, inputs), output_of(theirs, inputs), INTEROP_REL)


def test_orthogonal_regulariser_adds_its_gradient_once_per_step() -> None:
    config = AdaLoraConfig(**(ADA | {"orth_reg_weight": 0.3, "init_lora_weights": False}))
    model = get_peft_model(build("bert"), config)
    layers = _layers(model, "default")
    inputs = inputs_for("bert")
    params = [p for p in model.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        return output_of_grad(model, inputs).square().mean()

    # the expected gradient: autograd through loss + w·mean‖·‖_F
    terms = [torch.linalg.matrix_norm(layer.lora_A["default"] @ layer.lora_A["default"].T - torch.eye(4))
             for layer in layers.values()]
    terms += [torch.linalg.matrix_norm(layer.lora_B["default"].T @ layer.lora_B["default"] - torch.eye(4))
              for layer in layers.values()]
    expected = torch.autograd.grad(loss() + 0.3 * torch.stack(terms).mean(), params)
    regulariser = OrthogonalRegulariser(layers, "default", 0.3)
    loss().backward()
    got = [p.grad.clone() for p in params]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    loss().backward()  # a second micro-batch of the same step: the term is not added again
    plain = torch.autograd.grad(loss(), params)
    for p, g, e in zip(params, got, plain, strict=True):
        torch.testing.assert_close(p.grad, g + e, rtol=1e-5, atol=1e-7)
    regulariser.remove()


def output_of_grad(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def test_adalora_trains_through_peftkit_train(tmp_path) -> None:
    """The method's hooks run the schedule in ``peftkit train``: the saved adapter keeps
    target_r triplets per module on average, records them in rank_pattern, and loads in PEFT."""
    pytest.importorskip("accelerate")
    from peftkit.train import run_training
    from peftkit.train.config import build_config
    from test_train import _config, _sentiment_rows, _tiny_model_dir, _write_jsonl  # the training tests' tiny setup

    ws = {"bert": _tiny_model_dir(tmp_path, "bert"), "train": _write_jsonl(tmp_path / "train.jsonl", _sentiment_rows(48)),
          "val": _write_jsonl(tmp_path / "val.jsonl", _sentiment_rows(16))}
    raw = _config(ws, tmp_path / "run", epochs=2)
    raw["method"] = {"name": "adalora", "target_modules": ["query", "value"], "init_r": 4, "target_r": 2,
                     "tinit": 1, "tfinal": 2, "lora_alpha": 8}
    run_training(build_config(raw), quiet=True)
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 12  # 48 rows / 8 per batch × 2 epochs
    kept = saved["rank_pattern"]
    assert len(kept) == 4 and all(len(v) == 4 for v in kept.values())
    assert sum(sum(v) for v in kept.values()) == 2 * 4
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key, mask in kept.items():
        module = key.removesuffix(".lora_E")
        assert tensors[f"base_model.model.{module}.lora_A"].shape[0] == sum(mask)
    ours = PeftModel.from_pretrained(_load_tiny(ws["bert"]), adapter)
    theirs = _quiet(peft.PeftModel.from_pretrained, _load_tiny(ws["bert"]), adapter)
    ids = {"input_ids": torch.randint(1, 1000, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    assert_rounding_close(output_of(ours, ids), output_of(theirs, ids), INTEROP_REL)


def _load_tiny(path):
    from transformers import AutoModelForSequenceClassification

    return _quiet(AutoModelForSequenceClassification.from_pretrained, path, num_labels=2).eval()


# -- what they refuse, and how they say it ----------------------------------------------------
def test_unsupported_layers_are_refused_naming_the_types() -> None:
    for config, kind in ((LoHaConfig(target_modules=["emb"]), "mlp"), (LoKrConfig(target_modules=["conv1d"]), "cnn"),
                         (VeraConfig(r=4, target_modules=["conv1"]), "cnn"),
                         (OFTConfig(target_modules=["conv2"]), "cnn"), (AdaLoraConfig(target_modules=["c_attn"]), "gpt2")):
        model = build(kind)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(TargetError, match="Supported: nn.Linear"):
            get_peft_model(model, config)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: OFTConfig(r=4, oft_block_size=4), ValueError, "either r .* or oft_block_size"),
    (lambda: OFTConfig(coft=True), NotImplementedError, "coft"),
    (lambda: AdaLoraConfig(init_r=4, target_r=8), ValueError, "target_r .* at most init_r"),
    (lambda: AdaLoraConfig(total_step=10, tinit=6, tfinal=4), ValueError, "no pruning phase"),
    (lambda: VeraConfig(bias="all"), NotImplementedError, "bias='none'"),
    (lambda: LoKrConfig(init_weights="gaussian"), ValueError, "'lycoris'"),
    (lambda: LoHaConfig(r=0), ValueError, "r must be a positive integer"),
    (lambda: LoHaConfig(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\]"),
])
def test_bad_configs_say_what_is_wrong(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_methods_command_lists_the_five(capsys) -> None:
    from peftkit.cli import main

    assert main(["methods", "--presets"]) == 0
    out = capsys.readouterr().out
    for name in ("LOHA", "LOKR", "VERA", "OFT", "ADALORA"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
        assert f"compare preset {name.lower()}:" in out


@pytest.mark.parametrize("method", ["LOHA", "LOKR", "VERA", "ADALORA"])
def test_delta_methods_interpolate_and_run_per_example_adapters(method) -> None:
    """``ΔW`` enters linearly: WiSE-FT at strength 1/2 is halfway between base and adapted, and
    a batch with a different adapter per example gives each example its adapter's output."""
    from peftkit import interpolate

    case = next(c for c in CASES.values() if c[0] == method)
    _, kind, kwargs = case
    inputs = inputs_for(kind)
    model = get_peft_model(build(kind), OURS[method](**kwargs))
    model.add_adapter("other", OURS[method](**kwargs))
    for name in ("default", "other"):
        model.set_adapter(name)
        perturb(model, seed=len(name), scale=0.5)
    outs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outs[name] = output_of(model, inputs)
    base = output_of(build(kind), inputs)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names)
    mixed = mixed if isinstance(mixed, torch.Tensor) else mixed.logits
    for i, name in enumerate(names):
        want = base[i] if name == "__base__" else outs[name][i]
        assert_rounding_close(mixed[i], want, MODEL_REL, scale=base.abs().max().item())
    model.set_adapter("default")
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    x = torch.randn(4, layer.base_layer.weight.shape[1])
    with torch.no_grad():
        adapted, plain = layer(x), layer.base_layer(x)
        interpolate(model, 0.5)
        assert_rounding_close(layer(x), (adapted + plain) / 2, MODEL_REL, msg=name)


@pytest.mark.parametrize(("method", "kind", "expected"), [
    ("LOHA", "bert", ["query", "value"]), ("LOKR", "llama", ["q_proj", "v_proj"]), ("VERA", "t5", ["q", "v"]),
    ("OFT", "vit", ["q_proj", "v_proj"]), ("ADALORA", "mlp", "all-linear"),
])
def test_default_targets_are_the_attention_query_and_value(method, kind, expected) -> None:
    """Without target_modules (a compare preset names none) the query and value projections are
    adapted, else every linear layer; the config records the choice."""
    extra = {"r": 4, "oft_block_size": 0} if method == "OFT" else {"r": 4} if method == "VERA" else {}
    model = get_peft_model(build(kind), OURS[method](**extra))
    assert model.peft_config["default"].target_modules == expected


@pytest.mark.parametrize("config", [
    LoHaConfig(r=2, target_modules=["lin0", "lin1"], rank_dropout=0.5, init_weights=False),
    LoKrConfig(r=2, target_modules=["lin0", "lin1"], rank_dropout=0.5, rank_dropout_scale=True, init_weights=False),
    OFTConfig(r=0, oft_block_size=4, target_modules=["lin0", "lin1"], module_dropout=0.5, init_weights=False),
], ids=["loha", "lokr", "oft"])
def test_training_time_dropout_never_enters_a_merge(config) -> None:
    """Merging a model left in training mode folds in the whole ΔW (rotation), not a dropped one."""
    inputs = inputs_for("mlp")
    model = get_peft_model(build("mlp"), config)
    model.eval()
    expected = output_of(model, inputs)
    model.train()
    model.merge_adapter()
    model.eval()
    assert_rounding_close(output_of(model, inputs), expected, MODEL_REL)
