"""Sparse fine-tuning: budget, exact unmerge, file size, selection, invariants."""

from __future__ import annotations

import pytest
import torch

from adapter_checks import frozen_snapshot, train_steps
from models import build, inputs_for, output_of
from peftkit import PeftModel, SparseConfig, get_peft_model
from peftkit.methods.sparse import calibrate


@pytest.mark.parametrize("kind", ["mlp", "bert", "gpt2", "llama"])
@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_invariants_and_budget(kind, selection, tmp_path):
    inputs = inputs_for(kind)
    base = build(kind)
    base_out = output_of(base, inputs)
    model = get_peft_model(build(kind), SparseConfig(count=200, selection=selection))
    assert model.get_nb_trainable_parameters()[0] == 200
    assert torch.equal(output_of(model, inputs), base_out)
    frozen = frozen_snapshot(model)
    losses = train_steps(model, inputs, steps=4, lr=5e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[k], p) for k, p in model.named_parameters() if k in frozen)
    trained = output_of(model, inputs)
    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), base_out)
    model.save_pretrained(tmp_path)
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert len(raw) - 8 - header == 200 * (8 + 4)  # the data: int64 indices + float32 values, nothing else
    reloaded = PeftModel.from_pretrained(build(kind), tmp_path)
    assert torch.equal(output_of(reloaded, inputs), trained)
    before = {k: v.clone() for k, v in build(kind).state_dict().items()}
    merged_weights = {k.replace("base_layer.", ""): v.clone() for k, v in model.get_base_model().state_dict().items() if ".sparse_" not in k}
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, inputs), trained, rtol=1e-5, atol=1e-5)
    merged_state = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items() if ".sparse_" not in k}
    changed = sum(int((merged_state[k] != before[k]).sum()) for k in before)
    nonzero = sum(int((p != 0).sum()) for n, p in model.named_parameters() if ".sparse_values." in n)
    assert changed == nonzero  # only the selected entries moved
    if kind != "mlp":  # smooth activations: every selected weight gets a gradient (ReLU units can be dead)
        assert changed == 200
    model.unmerge_adapter()
    unmerged = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items() if ".sparse_" not in k}
    assert all(torch.equal(unmerged[k], before[k]) for k in before)  # bit-exact
    assert merged_weights.keys() == unmerged.keys()


def test_density_and_fisher_calibration_pick_what_matters():
    torch.manual_seed(0)
    model = get_peft_model(build("mlp"), SparseConfig(density=0.05, selection="fisher", target_modules=["lin0", "lin1"]))
    budget = model.get_nb_trainable_parameters()[0]
    assert budget == round(0.05 * 16 * 32) + round(0.05 * 32 * 32)
    inputs = inputs_for("mlp")
    target = torch.randn(3, 2)

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(**batch), target)

    calibrate(model, [inputs, inputs], loss_fn=loss_fn)
    assert model.get_nb_trainable_parameters()[0] == budget
    # the chosen entries of lin1 are those with the largest squared gradients
    lin1 = model.get_base_model().lin1
    w = lin1.base_layer.weight
    w.requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(model, inputs), [w])
    w.requires_grad_(False)
    chosen = set(lin1.sparse_indices["default"].tolist())
    top = set(torch.topk(g.pow(2).flatten(), len(chosen)).indices.tolist())
    assert len(chosen & top) >= 0.8 * len(chosen)


def test_config_errors():
    with pytest.raises(ValueError, match="exactly one"):
        SparseConfig()
    with pytest.raises(ValueError, match="density"):
        SparseConfig(density=1.5)
    with pytest.raises(ValueError, match="selection"):
        SparseConfig(count=10, selection="psychic")
    with pytest.raises(ValueError, match="exceeds"):
        get_peft_model(build("mlp"), SparseConfig(count=10**9))
