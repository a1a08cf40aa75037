"""(IA)³, BitFit, LayerNorm tuning, layer-wise and full fine-tuning: interoperability with
Hugging Face ``peft`` (both directions) and the behaviour of each method. The invariants
of DESIGN.md §6 (init, merging, files, trainable parameters, disabling, unloading) are
checked for these methods with all others in tests/test_invariants.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapter_checks import INTEROP_REL, assert_rounding_close
from invariant_cases import top_block_count
from models import MLP, build, inputs_for, output_of
from peftkit import (
    BitFitConfig,
    FullFineTuningConfig,
    GradualUnfreezer,
    IA3Config,
    LayerwiseConfig,
    LNTuningConfig,
    PeftConfig,
    PeftModel,
    TargetError,
    get_peft_model,
    layerwise_param_groups,
    list_methods,
)
from peftkit.core.layer import adapter_layers
from peftkit.methods.layernorm import is_norm
from peftkit.methods.layerwise import find_blocks

torch.set_num_threads(1)  # tiny models: a second thread only spins

_CACHE: dict[str, nn.Module] = {}


def fresh(kind: str) -> nn.Module:
    """A new copy of the tiny ``kind`` model, always with the same weights."""
    if kind not in _CACHE:
        _CACHE[kind] = build(kind)
    return copy.deepcopy(_CACHE[kind])


def plain_params(kind: str) -> dict[str, torch.Tensor]:
    return dict(fresh(kind).named_parameters())


def numel(params: dict[str, torch.Tensor], keep: Callable[[str], bool]) -> int:
    return sum(p.numel() for n, p in params.items() if keep(n))


def full_count(kind: str) -> int:
    return numel(plain_params(kind), lambda n: True)


def base_output(kind: str) -> torch.Tensor:
    return output_of(fresh(kind), inputs_for(kind))


def train(model: nn.Module, kind: str, steps: int = 4, lr: float = 0.05) -> list[float]:
    """A few Adam steps towards a fixed random target; the losses, first to last. The
    model stays in eval mode: no dropout noise in the losses."""
    inputs = inputs_for(kind)
    target = torch.randn(output_of(model, inputs).shape, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps + 1):
        out = model(**inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = nn.functional.mse_loss(logits, target)
        losses.append(loss.item())
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return losses


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's own parameters by their plain names (adapter layers see
    through to their base; adapter parameters left out)."""
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        parts = name.split(".")
        if any(part in ("ia3_l", "bitfit", "ln_tuning_layers", "modules_to_save") for part in parts):
            continue
        out[".".join(x for x in parts if x != "base_layer")] = p.detach().clone()
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal to the bit: for weights copied back, not computed back."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- interoperability with Hugging Face PEFT --------------------------------------------

IA3_INTEROP = {
    "bert": lambda: {},
    "gpt2": lambda: {},  # Conv1D, fan_in_fan_out
    "llama": lambda: {},
    "t5": lambda: {},
    "cnn": lambda: {"target_modules": ["conv1", "conv2"], "feedforward_modules": ["conv2"]},
}


def _randomise(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", list(IA3_INTEROP))
def test_ia3_files_load_in_peft_with_identical_outputs(kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(fresh(kind), IA3Config(**IA3_INTEROP[kind]()))
    _randomise(model)
    inputs = inputs_for(kind)
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path)
    assert_rounding_close(output_of(theirs, inputs), expected, INTEROP_REL)  # two libraries: within rounding
    theirs.merge_adapter()
    torch.testing.assert_close(output_of(theirs, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", list(IA3_INTEROP))
def test_peft_ia3_files_load_here_with_identical_outputs(kind, tmp_path):
    peft = pytest.importorskip("peft")
    options = IA3_INTEROP[kind]()
    if kind == "t5":  # PEFT's own default targets for T5 (k, v, wo; wo feed-forward)
        options = {}
    theirs = peft.get_peft_model(fresh(kind), peft.IA3Config(**options))
    _randomise(theirs)
    inputs = inputs_for(kind)
    expected = output_of(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(fresh(kind), tmp_path)
    assert_rounding_close(output_of(ours, inputs), expected, INTEROP_REL)
    ours.merge_adapter()
    torch.testing.assert_close(output_of(ours, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_ln_tuning_files_move_both_ways_with_peft(kind, tmp_path):
    peft = pytest.importorskip("peft")
    inputs = inputs_for(kind)
    ours = get_peft_model(fresh(kind), LNTuningConfig())
    _randomise(ours)
    expected = output_of(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path / "ours")
    assert_rounding_close(output_of(theirs, inputs), expected, INTEROP_REL)

    theirs = peft.get_peft_model(fresh(kind), peft.LNTuningConfig(target_modules=ours.peft_config["default"].target_modules))
    _randomise(theirs, seed=5)
    expected = output_of(theirs, inputs)
    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(fresh(kind), tmp_path / "theirs")
    assert_rounding_close(output_of(back, inputs), expected, INTEROP_REL)


# -- (IA)³ --------------------------------------------------------------------------------


def test_ia3_file_layout_is_peft_s(tmp_path):
    model = get_peft_model(fresh("gpt2"), IA3Config())
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert state["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (96, 1)  # output scaled
    assert state["base_model.model.transformer.h.1.mlp.c_proj.ia3_l"].shape == (1, 128)  # input scaled
    assert all(torch.equal(t, torch.ones_like(t)) for t in state.values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"]
    assert config["feedforward_modules"] == ["mlp.c_proj"]
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D
    assert config["init_ia3_weights"] is True
    assert "layers_to_transform" not in config  # PEFT's IA3Config has no such field


def test_ia3_scales_outputs_and_inputs_as_the_formula_says():
    torch.manual_seed(0)
    net = MLP()
    model = get_peft_model(copy.deepcopy(net), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    layers = dict(adapter_layers(model.get_base_model()))
    l0 = layers["lin0"].ia3_l["default"]
    l1 = layers["lin1"].ia3_l["default"]
    assert l0.shape == (32, 1) and l1.shape == (1, 32)
    with torch.no_grad():
        l0.uniform_(0.5, 1.5)
        l1.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    h0 = net.lin0(x) * l0.flatten()  # h = l ⊙ (W x + b)
    h1 = net.lin1(torch.relu(h0) * l1.flatten())  # h = W (l ⊙ x) + b
    inner = model.get_base_model()
    torch.testing.assert_close(inner.lin1(torch.relu(inner.lin0(x))), h1)


def test_ia3_adapters_combine_switch_and_choose_per_example():
    kind = "llama"
    inputs = inputs_for(kind)
    model = get_peft_model(fresh(kind), IA3Config(init_ia3_weights=False), "a")
    model.add_adapter("b", IA3Config(init_ia3_weights=False))
    out_a = output_of(model, inputs)
    model.set_adapter("b")
    out_b = output_of(model, inputs)
    assert not torch.allclose(out_a, out_b)
    mixed = model(**inputs, adapter_names=["a", "__base__", "b"]).logits.detach()
    torch.testing.assert_close(mixed[0], out_a[0])
    torch.testing.assert_close(mixed[1], base_output(kind)[1])
    torch.testing.assert_close(mixed[2], out_b[2])
    model.set_adapter(["a", "b"])  # both: the vectors multiply
    both = output_of(model, inputs)
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), both, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    model.delete_adapter("a")
    assert model.active_adapters == ["b"]
    torch.testing.assert_close(output_of(model, inputs), out_b)


def test_ia3_unmerge_is_exact_even_with_zero_entries():
    model = get_peft_model(fresh("bert"), IA3Config())
    layer = dict(adapter_layers(model.get_base_model()))["bert.encoder.layer.0.attention.self.key"]
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.ia3_l["default"][:4] = 0.0
    model.merge_adapter()
    assert torch.equal(layer.base_layer.weight[:4], torch.zeros(4, 32))
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, original)


def test_ia3_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="not in target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="yes")
    net = MLP()
    with pytest.raises(TargetError, match="no default targets for model type None"):
        get_peft_model(net, IA3Config())
    assert not any(True for _ in adapter_layers(net))
    with pytest.raises(TargetError, match="Embedding"):
        get_peft_model(MLP(), IA3Config(target_modules=["emb", "lin0"]))


# -- BitFit -----------------------------------------------------------------------------


def test_bitfit_paper_variant_trains_query_and_intermediate_biases(tmp_path):
    model = get_peft_model(fresh("bert"), BitFitConfig(target_modules=["query", "intermediate.dense"]))
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 + 37)
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(
        f"base_model.model.bert.encoder.layer.{i}.{m}.bias" for i in range(2) for m in ("attention.self.query", "intermediate.dense")
    )


def test_bitfit_file_is_a_partial_state_dict_of_the_plain_model(tmp_path):
    kind = "gpt2"
    model = get_peft_model(fresh(kind), BitFitConfig())
    _randomise(model)
    expected = output_of(model, inputs_for(kind))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    plain = fresh(kind)
    missing, unexpected = plain.load_state_dict({k.removeprefix("base_model.model."): v for k, v in state.items()}, strict=False)
    assert not unexpected and all(not k.endswith("bias") for k in missing if "attn.bias" not in k)
    assert torch.equal(output_of(plain, inputs_for(kind)), expected)


def test_bitfit_adapters_switch_disable_and_delete():
    kind = "bert"
    inputs = inputs_for(kind)
    model = get_peft_model(fresh(kind), BitFitConfig(), "a")
    model.add_adapter("b", BitFitConfig(target_modules=["query"]))
    _randomise(model)
    out_a = output_of(model, inputs)
    model.set_adapter("b")
    _randomise(model, seed=9)
    assert model.get_nb_trainable_parameters()[0] == 2 * 32
    out_b = output_of(model, inputs)
    assert not torch.allclose(out_a, out_b)
    model.set_adapter("a")
    assert torch.equal(output_of(model, inputs), out_a)
    mixed = model(**inputs, adapter_names=["b", "a", "__base__"]).logits.detach()
    torch.testing.assert_close(mixed, torch.stack([out_b[0], out_a[1], base_output(kind)[2]]))
    model.set_adapter(["a", "b"])  # both: p₀ + Σ (p_i − p₀)
    both = output_of(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), both, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    model.set_adapter("a")
    model.delete_adapter("b")
    assert torch.equal(output_of(model, inputs), out_a)
    assert torch.equal(output_of(model.unload(), inputs), base_output(kind))


def test_bitfit_on_a_model_without_biases_says_what_to_use():
    with pytest.raises(TargetError, match=r"no bias parameters.*LNTuningConfig"):
        get_peft_model(fresh("llama"), BitFitConfig())


# -- LayerNorm tuning --------------------------------------------------------------------


class ScaleNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / x.norm(dim=-1, keepdim=True)


class NotANormScale(ScaleNorm):
    pass


NotANormScale.__name__ = "Scale"


def test_norms_are_recognised_by_duck_typing():
    assert is_norm(nn.LayerNorm(8)) and is_norm(nn.RMSNorm(8)) and is_norm(nn.GroupNorm(2, 8))
    assert is_norm(ScaleNorm(8))
    assert not is_norm(NotANormScale(8))  # no "Norm" in the class name
    assert not is_norm(nn.LayerNorm(8, elementwise_affine=False))  # nothing to train
    assert not is_norm(nn.Linear(8, 8))
    odd = ScaleNorm(8)
    odd.extra = nn.Parameter(torch.ones(8))
    assert not is_norm(odd)  # a parameter that is not a scale or shift
    llama = fresh("llama")
    assert is_norm(llama.model.norm) and is_norm(fresh("t5").encoder.final_layer_norm)


def test_ln_tuning_saved_config_names_the_norms_and_errors_without_them(tmp_path):
    model = get_peft_model(fresh("llama"), LNTuningConfig())
    assert sorted(model.peft_config["default"].target_modules) == ["input_layernorm", "norm", "post_attention_layernorm"]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    with pytest.raises(TargetError, match="no normalisation layer"):
        get_peft_model(MLP(), LNTuningConfig())
    with pytest.raises(TargetError, match="cannot adapt"):
        get_peft_model(fresh("bert"), LNTuningConfig(target_modules=["query"]))


# -- layer-wise fine-tuning ----------------------------------------------------------------


def test_block_lists_are_found_and_chosen():
    assert find_blocks(fresh("bert")).name == "bert.encoder.layer"
    assert find_blocks(fresh("gpt2")).name == "transformer.h"
    assert find_blocks(fresh("t5")).name == "decoder.block"  # a tie: the one nearest the output
    assert find_blocks(fresh("t5"), "encoder.block").name == "encoder.block"
    with pytest.raises(TargetError, match="no list of repeated blocks"):
        find_blocks(MLP())
    with pytest.raises(TargetError, match="block lists found"):
        find_blocks(fresh("gpt2"), "layers")


def test_layerwise_trains_chosen_blocks_and_named_modules(tmp_path):
    kind = "gpt2"
    params = plain_params(kind)
    model = get_peft_model(fresh(kind), LayerwiseConfig(layers=[0], target_modules=["ln_f"], exclude_modules=["ln_1"]))
    expected = {n for n in params if (n.startswith("transformer.h.0.") and ".ln_1." not in n) or n.startswith("transformer.ln_f.")}
    assert {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad} == expected
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"base_model.model." + n for n in expected}
    top = get_peft_model(fresh(kind), LayerwiseConfig(layers=-1))
    assert top.get_nb_trainable_parameters()[0] == top_block_count(kind)


def test_layerwise_config_errors_leave_the_model_alone():
    with pytest.raises(ValueError, match="trains nothing"):
        LayerwiseConfig()
    with pytest.raises(ValueError, match="either top_layers or layers"):
        LayerwiseConfig(top_layers=1, layers=[0])
    with pytest.raises(ValueError, match="positive integer"):
        LayerwiseConfig(top_layers=0)
    model = fresh("bert")
    with pytest.raises(TargetError, match="holds 2 blocks"):
        get_peft_model(model, LayerwiseConfig(top_layers=3, task_type="SEQ_CLS"))
    assert not any(True for _ in adapter_layers(model))


def test_in_place_adapters_one_per_model_and_delete_needs_the_original():
    kind = "gpt2"
    model = get_peft_model(fresh(kind), LayerwiseConfig(top_layers=1))
    with pytest.raises(ValueError, match="already holds the in-place adapter"):
        model.add_adapter("other", LayerwiseConfig(top_layers=2))
    train(model, kind, steps=1)
    with pytest.raises(RuntimeError, match="keep_original=True"):
        model.delete_adapter("default")
    assert model.get_nb_trainable_parameters()[0] == top_block_count(kind)
    with pytest.raises(RuntimeError, match="cannot be chosen per example"):
        model(**inputs_for(kind), adapter_names=["default", "__base__", "default"])
    assert torch.equal(output_of(model.merge_and_unload(), inputs_for(kind)), output_of(model, inputs_for(kind)))

    kept = get_peft_model(fresh(kind), FullFineTuningConfig(keep_original=True))
    train(kept, kind, steps=1)
    kept.delete_adapter("default")
    assert not kept.peft_config
    assert_same_weights(weights(kept), weights(fresh(kind)))


def test_full_fine_tuning_file_holds_the_whole_state(tmp_path):
    kind = "bert"
    model = get_peft_model(fresh(kind), FullFineTuningConfig(task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"base_model.model." + n for n in plain_params(kind)}  # the classifier as a trained copy
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "FULL"
    model = get_peft_model(fresh(kind), FullFineTuningConfig(exclude_modules=["embeddings"]))
    frozen = numel(plain_params(kind), lambda n: n.startswith("bert.embeddings."))
    assert model.get_nb_trainable_parameters()[0] == full_count(kind) - frozen


def test_layerwise_param_groups_decay_towards_the_input():
    kind = "bert"
    model = get_peft_model(fresh(kind), FullFineTuningConfig())
    groups = layerwise_param_groups(model, lr=1.0, decay=0.5)
    by_name = {g["name"]: g for g in groups}
    assert [g["lr"] for g in groups] == [1.0, 0.5, 0.25]  # top block + head, block 0, embeddings
    assert set(by_name) == {"block 1 and above", "block 0", "below the blocks"}
    ids = {id(p) for g in groups for p in g["params"]}
    assert len(ids) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    embeddings = {id(p) for n, p in model.named_parameters() if ".embeddings." in n}
    assert {id(p) for p in by_name["below the blocks"]["params"]} == embeddings
    torch.optim.AdamW(groups)  # a valid optimiser spec
    with pytest.raises(ValueError, match="decay"):
        layerwise_param_groups(model, lr=1.0, decay=0.0)


def test_gradual_unfreezer_opens_one_block_per_epoch():
    kind = "gpt2"
    model = get_peft_model(fresh(kind), LayerwiseConfig(top_layers=2, target_modules=["ln_f"]))
    unfreezer = GradualUnfreezer(model)
    trainable = lambda: {n.split(".")[4] if ".h." in n else "rest" for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable() == {"1", "rest"}  # epoch 0: the top block (and ln_f)
    opt = torch.optim.SGD(unfreezer.parameters(), lr=0.1)
    low = model.get_base_model().transformer.h[0].mlp.c_fc.weight
    before = low.detach().clone()
    inputs = inputs_for(kind)
    model(**inputs).logits.square().mean().backward()
    opt.step()
    assert torch.equal(low, before)  # frozen block untouched
    assert unfreezer.step(1) == 2 and trainable() == {"0", "1", "rest"}
    assert unfreezer.step(5) == 2  # capped at the number of blocks
    scheduled = GradualUnfreezer(model, schedule=[0, 0, 2])
    assert scheduled.step(0) == 0 and trainable() == {"rest"}
    assert scheduled.step(2) == 2 and scheduled.step(9) == 2
    with pytest.raises(ValueError, match="nothing to unfreeze"):
        GradualUnfreezer(get_peft_model(fresh(kind), LayerwiseConfig(target_modules=["ln_f"])))


def test_list_methods_describes_each_method():
    methods = list_methods()
    for peft_type in ("IA3", "BITFIT", "LN_TUNING", "LAYERWISE", "FULL"):
        assert len(methods[peft_type]) > 30
    assert isinstance(PeftConfig.from_dict({"peft_type": "IA3"}), IA3Config)
    assert isinstance(PeftConfig.from_dict({"peft_type": "LAYERWISE", "top_layers": 1}), LayerwiseConfig)


def test_an_adapter_added_while_another_is_merged_starts_from_the_original_values():
    kind = "bert"
    inputs = inputs_for(kind)
    for config in (LNTuningConfig, BitFitConfig):
        model = get_peft_model(fresh(kind), config(), "a")
        _randomise(model)
        model.merge_adapter()
        model.add_adapter("b", config())
        model.unmerge_adapter()
        model.set_adapter("b")
        assert torch.equal(output_of(model, inputs), base_output(kind))


def test_ia3_model_moves_between_devices_and_dtypes():
    """`.to()` walks every module's `_apply`; an adapter layer must not shadow it."""
    from peftkit import IA3Config

    model = get_peft_model(build("bert"), IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]))
    model.to(torch.float64).to(torch.float32).to("cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
