"""Relevance scores, adaptive rank allocation and WiSE-FT interpolation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import build, inputs_for, output_of
from peftkit import LoraConfig, PeftModel, RankAllocator, get_peft_model, interpolate, relevance_scores


class TwoPaths(nn.Module):
    """The loss provably depends on `used` only: `unused` feeds a branch multiplied by zero."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x, y):
        h = torch.tanh(self.used(x)) + 0.0 * self.unused(x)
        return ((self.head(h).squeeze(-1) - y) ** 2).mean()


def test_relevance_ranks_needed_module_above_unneeded():
    torch.manual_seed(0)
    model = TwoPaths()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = copy.deepcopy(model.state_dict())
    batches = [{"x": torch.randn(16, 8), "y": torch.randn(16)} for _ in range(3)]
    report = relevance_scores(model, batches, loss_fn=lambda m, b: m(**b))
    scores = {m.name: m for m in report.modules}
    assert scores["used"].fisher > 0 and scores["unused"].fisher == 0.0
    assert scores["used"].saliency > scores["unused"].saliency == 0.0
    assert all(torch.isfinite(torch.tensor([m.fisher, m.saliency])).all() for m in report.modules)
    assert report.lora_targets(share=0.5)[0] in ("used", "head")
    assert "unused" not in report.lora_targets(share=0.99)
    # the model is left as it was
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_relevance_on_transformer_layers_and_proposals(tmp_path):
    model = build("bert")
    inputs = inputs_for("bert")
    batches = [{**inputs, "labels": torch.tensor([0, 1, 1])}]
    report = relevance_scores(model, batches)
    layers, kinds, grid = report.heatmap()
    assert layers == [0, 1] and "query" in kinds and len(grid) == 2
    assert set(report.by_layer()) == {0, 1}
    targets = report.lora_targets(share=0.5)
    pattern = report.rank_pattern(targets, mean_rank=4)
    assert set(pattern) == set(targets) and all(r >= 1 for r in pattern.values())
    assert report.top_layers(1)[0] in (0, 1)
    pytest.importorskip("matplotlib")
    report.plot(str(tmp_path / "heat.png"))
    assert (tmp_path / "heat.png").stat().st_size > 1000


def _train_steps(model, inputs, labels, steps, callback=None, lr=0.05):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step)
        opt.zero_grad()
    model.eval()


def test_adaptive_lora_ends_at_budget_and_saves_plain_lora(tmp_path):
    model = get_peft_model(build("bert"), LoraConfig(r=6, lora_alpha=12, target_modules=["query", "value", "key"], task_type="SEQ_CLS"))
    inputs = inputs_for("bert")
    labels = torch.tensor([0, 1, 1])
    steps = 40
    alloc = RankAllocator(model, target_r=2, total_steps=steps, warmup_steps=5, final_steps=10, interval=5)
    _train_steps(model, inputs, labels, steps, callback=alloc.step)
    out = output_of(model, inputs)
    ranks = alloc.finalize()
    assert sum(ranks.values()) == 2 * 6  # 6 modules x target 2
    assert len(set(ranks.values())) > 1 or all(r == 2 for r in ranks.values())
    # cutting the switched-off components leaves the function unchanged
    torch.testing.assert_close(output_of(model, inputs), out, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build("bert"), tmp_path)
    torch.testing.assert_close(output_of(reloaded, inputs), out, rtol=0, atol=1e-6)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path))
    torch.testing.assert_close(output_of(theirs, inputs), out, rtol=0, atol=1e-5)


def test_interpolation_endpoints_are_exact_for_lora():
    inputs = inputs_for("bert")
    base_out = output_of(build("bert"), inputs)
    model = get_peft_model(build("bert"), LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS"))
    _train_steps(model, inputs, torch.tensor([0, 1, 1]), 3)
    tuned = output_of(model, inputs)
    interpolate(model, 0.0)
    assert torch.equal(output_of(model, inputs), base_out)
    interpolate(model, 0.5)
    half = output_of(model, inputs)
    assert not torch.equal(half, base_out) and not torch.equal(half, tuned)
    interpolate(model, 1.0)
    assert torch.equal(output_of(model, inputs), tuned)


def test_interpolation_of_plain_full_finetuning():
    inputs = inputs_for("mlp")
    pretrained = build("mlp")
    tuned_model = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in tuned_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tuned = output_of(tuned_model, inputs)
    interpolate(tuned_model, 0.0, pretrained=pretrained)
    assert torch.equal(output_of(tuned_model, inputs), output_of(pretrained, inputs))
    interpolate(tuned_model, 1.0, pretrained=pretrained)
    assert torch.equal(output_of(tuned_model, inputs), tuned)
    with pytest.raises(ValueError, match="pretrained"):
        interpolate(copy.deepcopy(pretrained), 0.5)


def test_interpolation_of_in_place_full_finetuning():
    from peftkit import FullFineTuningConfig

    inputs = inputs_for("mlp")
    pretrained = build("mlp")
    model = get_peft_model(build("mlp"), FullFineTuningConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    tuned = output_of(model, inputs)
    interpolate(model, 0.0, pretrained=pretrained)
    assert torch.equal(output_of(model, inputs), output_of(pretrained, inputs))
    interpolate(model, 1.0, pretrained=pretrained)
    assert torch.equal(output_of(model, inputs), tuned)
    with pytest.raises(ValueError, match="pretrained"):
        interpolate(model, 0.5)


def test_relevance_scores_convolutions_and_plots_models_without_blocks(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)

    class Stage(torch.nn.Module):
        def __init__(self, c_in: int, c_out: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
            self.depthwise = torch.nn.Conv2d(c_out, c_out, 3, padding=1, groups=c_out)

        def forward(self, x):
            return torch.relu(self.depthwise(self.conv(x)))

    cnn = torch.nn.Sequential()
    cnn.stages = torch.nn.ModuleList([Stage(1, 4), Stage(4, 4)])
    cnn.head = torch.nn.Linear(4 * 8 * 8, 3)
    cnn.forward = lambda x: cnn.head(cnn.stages[1](cnn.stages[0](x)).flatten(1))
    batch = {"x": torch.randn(6, 1, 8, 8), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    loss = lambda model, b: torch.nn.functional.cross_entropy(model(b["x"]), b["y"])  # noqa: E731
    report = relevance_scores(cnn, [batch], loss_fn=loss)
    scored = {m.name: m.layer for m in report.modules}
    assert scored == {"stages.0.conv": 0, "stages.1.conv": 1, "head": None}  # grouped convolutions are not LoRA targets
    report.plot(str(tmp_path / "cnn.png"))
    flat = relevance_scores(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                            [{"x": torch.randn(3, 4), "y": torch.tensor([0, 1, 0])}], loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"]))
    flat.plot(str(tmp_path / "flat.png"))  # no repeated blocks: one bar per module
    assert (tmp_path / "cnn.png").stat().st_size > 0 and (tmp_path / "flat.png").stat().st_size > 0
