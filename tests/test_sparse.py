"""Sparse fine-tuning: file size, merging touches the selected weights only, selection,
config errors. The invariants (budget, exact unmerge...) are in tests/test_invariants.py."""

from __future__ import annotations

import pytest
import torch

from adapter_checks import train_steps
from models import build, inputs_for
from peftkit import SparseConfig, get_peft_model
from peftkit.methods.sparse import calibrate


@pytest.mark.parametrize("kind", ["mlp", "bert", "gpt2", "llama"])
@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_the_file_and_the_merge_hold_the_budget_only(kind, selection, tmp_path):
    """The file holds 200 indices and values and nothing else; merging moves the selected
    weights only. (Budget, exact unmerge and the other invariants: tests/test_invariants.py.)"""
    inputs = inputs_for(kind)
    model = get_peft_model(build(kind), SparseConfig(count=200, selection=selection))
    train_steps(model, inputs, steps=4, lr=5e-2)
    model.save_pretrained(tmp_path)
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert len(raw) - 8 - header == 200 * (8 + 4)  # the data: int64 indices + float32 values, nothing else
    before = {k: v.clone() for k, v in build(kind).state_dict().items()}
    model.merge_adapter()
    merged_state = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items() if ".sparse_" not in k}
    assert merged_state.keys() == before.keys()
    changed = sum(int((merged_state[k] != before[k]).sum()) for k in before)
    nonzero = sum(int((p != 0).sum()) for n, p in model.named_parameters() if ".sparse_values." in n)
    assert changed == nonzero  # only the selected entries moved
    if kind != "mlp":  # smooth activations: every selected weight gets a gradient (ReLU units can be dead)
        assert changed == 200


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
