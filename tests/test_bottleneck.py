"""Bottleneck adapters: the default targets of each variant and their parameter count,
adapters per example, config errors. The invariants (they cannot be merged) are in
tests/test_invariants.py."""

from __future__ import annotations

import pytest
import torch

from adapter_checks import perturb
from models import build, inputs_for, output_of
from peftkit import BottleneckConfig, get_peft_model


def _wrapped(kind: str, variant: str, **kw):
    return get_peft_model(build(kind), BottleneckConfig(variant=variant, bottleneck_size=4, **kw))


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
