"""Bottleneck adapters: the invariants that apply (they cannot be merged), counts, variants."""

from __future__ import annotations

import pytest
import torch

from adapter_checks import frozen_snapshot, perturb, train_steps
from models import build, inputs_for, output_of
from peftkit import BottleneckConfig, PeftModel, get_peft_model

FAMILIES = ["bert", "gpt2", "llama", "t5", "vit"]
VARIANTS = ["houlsby", "pfeiffer", "parallel"]


def _wrapped(kind: str, variant: str, **kw):
    return get_peft_model(build(kind), BottleneckConfig(variant=variant, bottleneck_size=4, **kw))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_invariants(kind, variant, tmp_path):
    inputs = inputs_for(kind)
    base_out = output_of(build(kind), inputs)
    model = _wrapped(kind, variant)
    assert torch.equal(output_of(model, inputs), base_out)  # near identity at init
    frozen = frozen_snapshot(model)
    losses = train_steps(model, inputs, steps=4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[k], p) for k, p in model.named_parameters() if k in frozen)
    trained = output_of(model, inputs)
    assert not torch.allclose(trained, base_out)
    with model.disable_adapter():
        assert torch.equal(output_of(model, inputs), base_out)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(kind), tmp_path)
    assert torch.equal(output_of(reloaded, inputs), trained)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapter_down." in n or ".adapter_up." in n for n in names)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    assert torch.equal(output_of(model, inputs), trained)  # a refused merge changes nothing
    plain = model.unload()
    assert torch.equal(output_of(plain, inputs), base_out)


def test_trainable_count_follows_the_formula():
    model = get_peft_model(build("bert"), BottleneckConfig(variant="houlsby", reduction_factor=4))
    d, m = 32, 8
    adapters = 2 * 2  # 2 layers x (attention output, feed-forward output)
    assert model.get_nb_trainable_parameters()[0] == adapters * (2 * d * m + m + d)
    pfeiffer = get_peft_model(build("bert"), BottleneckConfig(variant="pfeiffer", reduction_factor=4))
    assert pfeiffer.get_nb_trainable_parameters()[0] == 2 * (2 * d * m + m + d)
    targets = [n for n, _ in pfeiffer.named_modules() if n.endswith("output.dense") and "attention" not in n and "base_layer" not in n]
    assert len(targets) == 2


def test_per_example_adapters_and_errors():
    inputs = inputs_for("llama")
    model = _wrapped("llama", "houlsby")
    perturb(model)
    model.add_adapter("other", BottleneckConfig(bottleneck_size=2))
    perturb(model, seed=3)
    out_default = output_of(model, inputs)
    mixed = model(**inputs, adapter_names=["default", "__base__", "default"]).logits
    torch.testing.assert_close(mixed[0], out_default[0])
    with pytest.raises(ValueError, match="variant"):
        BottleneckConfig(variant="sideways")
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="softmax")
