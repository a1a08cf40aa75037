"""The fused LoRA linear (``methods/lora/fused.py``): same outputs and gradients as the
layer written as separate operations, and taken only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_checks import FLOAT32_EPS, assert_rounding_close, perturb, rounding_tolerance
from models import build, inputs_for
from peftkit import LoraConfig, get_peft_model
from peftkit.core.layer import adapter_layers
from peftkit.methods.lora.fused import lora_linear
from peftkit.methods.lora.layer import LoraLinear


def _reference(x, xd, weight, bias, a, b, s):
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, a), b) * s


@pytest.mark.parametrize("scaling", [2.0, 0.37])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_matches_separate_operations(scaling: float, dropout: bool, x_grad: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g).requires_grad_(x_grad)
    weight, bias = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    a = torch.randn(4, 16, generator=g).requires_grad_()
    b = torch.randn(24, 4, generator=g).requires_grad_()
    mask = (torch.rand(3, 5, 16, generator=g) > 0.25).float() / 0.75
    grad_out = torch.randn(3, 5, 24, generator=g)
    wanted = [t for t in (x, a, b) if t.requires_grad]
    outs, grads = [], []
    for fn in (lora_linear, _reference):
        xd = x * mask if dropout else x
        y = fn(x, xd, weight, bias, a, b, scaling)
        outs.append(y)
        grads.append(torch.autograd.grad(y, wanted, grad_out))
    # The two forms multiply the same matrices in other layouts (addmm_ into the base output,
    # (uᵀg)ᵀ for B's gradient), and BLAS kernels round those differently from one CPU to the
    # next, whatever the scaling: equal within float32 rounding of the longest sum, over
    # max(in 16, out 24, rows 3·5) terms. (Measured: at most 2.4 eps of the largest entry.)
    rel = rounding_tolerance(max(16, 24, 3 * 5))
    assert_rounding_close(outs[0], outs[1], rel)
    for name, p, q in zip(("x", "A", "B")[3 - len(wanted):], *grads, strict=True):
        assert_rounding_close(p, q, rel, msg=f"gradient of {name}")
    assert outs[0].shape == (3, 5, 24)


def test_fused_without_gradients_matches() -> None:
    g = torch.Generator().manual_seed(1)
    x, weight, a, b = torch.randn(7, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, x, weight, None, a, b, 0.5), _reference(x, x, weight, None, a, b, 0.5))


TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_proj"]}


def _tiny_lora(kind: str = "bert", **kw) -> nn.Module:
    model = get_peft_model(build(kind), LoraConfig(r=4, target_modules=TARGETS[kind], **kw))
    perturb(model)  # B ≠ 0, so the adapter changes outputs
    return model


def _first_lora(model: nn.Module) -> LoraLinear:
    return next(layer for _, layer in adapter_layers(model) if isinstance(layer, LoraLinear))


def _train_losses(model: nn.Module, kind: str, steps: int = 4) -> list[float]:
    """SGD steps on the task's own loss (cross-entropy: gradients of order 1, so that every
    LoRA weight moves well past its rounding and a wrong gradient shows)."""
    torch.manual_seed(0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = inputs_for(kind)
    labels = inputs["input_ids"] if kind == "gpt2" else torch.tensor([0, 1, 1])
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["bert", "gpt2"])  # nn.Linear; GPT-2's Conv1D (weight in × out)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_is_the_same_on_either_path(kind: str, dropout: float, monkeypatch) -> None:
    steps = 4
    fused = _tiny_lora(kind, lora_dropout=dropout)
    general = copy.deepcopy(fused)
    start = {n: p.detach().clone() for n, p in fused.named_parameters()}
    assert _first_lora(fused).fused_adapter(torch.zeros(1, 32), (), {}) == "default"
    fused_losses = _train_losses(fused, kind, steps)
    monkeypatch.setattr(LoraLinear, "fused_adapter", lambda self, x, args, kwargs: None)
    general_losses = _train_losses(general, kind, steps)
    # Both paths compute the same function, but their products round differently (see
    # test_fused_matches_separate_operations), so training agrees within float32 rounding
    # that adds up step by step. A step's gradients may differ by a rounding of the longest
    # sum in these models (GPT-2's feed-forward, 4·32 wide), and the weights they update
    # by up to one ulp more (each side rounds w + Δw to nearest). Over a few steps the runs
    # stay close enough for a difference to propagate only to first order: the bounds add
    # up linearly, one per step.
    grad_rel = rounding_tolerance(4 * 32)
    loss_rel = steps * grad_rel
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(general_losses), rtol=loss_rel, atol=0.0)
    for (n, p), (_, q) in zip(fused.named_parameters(), general.named_parameters(), strict=True):
        if not q.requires_grad:
            assert torch.equal(p, q), f"frozen {n} changed"
            continue
        moved = (q - start[n]).abs().max().item()  # the size of the updates, all steps together
        assert moved > 0, f"{n} did not train"
        atol = steps * (FLOAT32_EPS * q.abs().max().item() + grad_rel * moved)
        torch.testing.assert_close(p, q, rtol=0.0, atol=atol, msg=n)


def test_general_path_where_fusing_does_not_apply() -> None:
    model = _tiny_lora()
    layer = _first_lora(model)
    x = torch.zeros(2, 32)
    assert layer.fused_adapter(x, (), {}) == "default"
    assert layer.fused_adapter(x.bfloat16(), (), {}) is None  # dtypes differ
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.fused_adapter(x, (), {}) is None
    layer.base_layer.weight.requires_grad_(True)  # the base trains too: its gradient is needed
    assert layer.fused_adapter(x, (), {}) is None
    layer.base_layer.weight.requires_grad_(False)
    with model.disable_adapter():
        assert layer.fused_adapter(x, (), {}) is None
    model.add_adapter("second", LoraConfig(r=2, target_modules=["query", "value"]))
    model.set_adapter(["default", "second"])
    assert layer.fused_adapter(x, (), {}) is None


def test_hooks_on_the_base_layer_still_run() -> None:
    model = _tiny_lora()
    layer = _first_lora(model)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    assert layer.fused_adapter(torch.zeros(1, 32), (), {}) is None
    expected = model(**inputs_for("bert")).logits
    assert seen, "a forward hook on the wrapped layer must be called"
    handle.remove()
    torch.testing.assert_close(model(**inputs_for("bert")).logits, expected)


def test_dora_takes_the_general_path() -> None:
    model = _tiny_lora(use_dora=True)
    assert _first_lora(model).fused_adapter(torch.zeros(1, 32), (), {}) is None


def _two_adapter_llama(second_rank: int) -> nn.Module:
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=targets))
    model.add_adapter("other", LoraConfig(r=second_rank, lora_alpha=3, target_modules=targets))
    for name, seed in (("default", 1), ("other", 2)):
        model.set_adapter(name)
        perturb(model, seed=seed, scale=1.0)
    return model.eval()


@pytest.mark.parametrize("second_rank", [4, 2])  # equal ranks: batched products; else per group
def test_mixed_batch_matches_single_adapter_passes(second_rank: int, monkeypatch) -> None:
    model = _two_adapter_llama(second_rank)
    calls: list[bool] = []
    original = LoraLinear.add_per_example

    def spy(self, x, result):
        calls.append(original(self, x, result))
        return calls[-1]

    monkeypatch.setattr(LoraLinear, "add_per_example", spy)
    inputs = inputs_for("llama", batch=4)
    names = ["other", "default", "default", "other"]  # every example has an adapter
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model(**inputs).logits
    assert calls and all(calls) == (second_rank == 4)
    assert not torch.allclose(alone["default"], alone["other"])
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=1e-5)
    assert all(not layer.example_cache for _, layer in adapter_layers(model))  # released after the call

    ids = inputs["input_ids"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for name in ("default", "other"):
        model.set_adapter(name)
        single = model.generate(input_ids=ids, **kwargs)
        for i in (i for i, n in enumerate(names) if n == name):
            assert torch.equal(generated[i], single[i]), (i, name)
