"""The README's quick start on a tiny model: wrap, train a step, save, reload."""

from __future__ import annotations

import torch

from adapter_checks import MODEL_REL, assert_rounding_close
from models import build, inputs_for, output_of
from peftkit import LoraConfig, PeftModel, get_peft_model


def test_readme_quickstart_round_trip(tmp_path):
    inputs = inputs_for("bert")
    base_out = output_of(build("bert"), inputs)
    model = get_peft_model(build("bert"), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert_rounding_close(output_of(model, inputs), base_out, MODEL_REL)  # the wrapped layers: within rounding
    trainable, _ = model.get_nb_trainable_parameters()
    # 2 layers x (query + value) x (A: 4x32 + B: 32x4) + classifier copy (2x32 + 2)
    assert trainable == 2 * 2 * (4 * 32 + 32 * 4) + 66
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(**inputs, labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = output_of(model, inputs)
    assert not torch.allclose(trained, base_out)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(build("bert"), tmp_path)
    assert torch.equal(output_of(reloaded, inputs), trained)


def test_forward_signature_is_the_wrapped_models():
    """Tools such as the transformers Trainer keep only the columns `forward` names."""
    import copy
    import inspect

    model = get_peft_model(build("bert"), LoraConfig(r=2, target_modules=["query"]))
    params = inspect.signature(model.forward).parameters
    assert "input_ids" in params and "labels" in params and "adapter_names" in params
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    inputs = inputs_for("bert")
    assert torch.equal(output_of(clone, inputs), output_of(model, inputs))
