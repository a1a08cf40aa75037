"""Which modules and layers matter for a task: gradient-based relevance scores.

For every weight matrix ``W`` of a candidate module, over a sample of batches:
- Fisher (diagonal, empirical): ``F = Σ_batches Σ_ij (∂L/∂W_ij)²``
- saliency: ``S = Σ_batches Σ_ij |∂L/∂W_ij · W_ij|`` (first-order estimate of the loss change
  if the weight were removed).
Scores are summed per module, then per layer (block index) and per module kind (the last
part of the name: ``query``, ``dense``, ``q_proj``...). From them the report proposes LoRA
targets covering a share of the total score, a rank pattern, or the layers to fine-tune.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.targeting import layer_index
from peftkit.integrations.transformers import is_linear_like

__all__ = ["ModuleScore", "RelevanceReport", "relevance_scores"]

SCORES = ("fisher", "saliency")


@dataclass
class ModuleScore:
    name: str
    kind: str
    layer: int | None
    params: int
    fisher: float
    saliency: float


def _default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no .loss; pass batches with labels or a loss_fn(model, batch)")
    return loss


def _adaptable(module: nn.Module) -> bool:
    """Linear layers, GPT-2's ``Conv1D`` and ungrouped convolutions: what LoRA adapts."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.groups == 1
    return is_linear_like(module)


def relevance_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    is_candidate: Callable[[nn.Module], bool] | None = None,
    layers_pattern: str | None = None,
    max_batches: int | None = None,
) -> RelevanceReport:
    """Scores the candidate modules of ``model`` (linear and convolution layers by default) on ``batches``.

    The model's ``requires_grad`` flags and ``.grad`` fields are restored afterwards; its
    weights are not changed.

    Args:
        model: the model to analyse (not wrapped, or wrapped: base weights are scored).
        batches: dicts of model inputs (with labels when ``loss_fn`` is None).
        loss_fn: ``(model, batch) -> loss``; default ``model(**batch).loss``.
        is_candidate: which modules to score (default: linear layers, GPT-2 ``Conv1D`` and
            ungrouped convolutions).
        layers_pattern: attribute holding the blocks, for the layer index (guessed if None).
        max_batches: stop after this many batches.

    Returns:
        A :class:`RelevanceReport`.
    """
    is_candidate = is_candidate or _adaptable
    modules = [(n, m) for n, m in model.named_modules() if n and is_candidate(m) and getattr(m, "weight", None) is not None]
    if not modules:
        raise ValueError("no candidate module with a weight found in the model")
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in model.parameters()}
    weights = [m.weight for _, m in modules]
    fisher = [torch.zeros((), dtype=torch.float64) for _ in modules]
    saliency = [torch.zeros((), dtype=torch.float64) for _ in modules]
    was_training = model.training
    model.eval()  # no dropout: the scores then depend on the data alone
    seen = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            loss = (loss_fn or _default_loss)(model, batch)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
                if g is None:
                    continue
                g = g.detach().double()
                fisher[i] += g.pow(2).sum().cpu()
                saliency[i] += (g * w.detach().double()).abs().sum().cpu()
            seen += 1
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = saved_grads[p]
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batch was given")
    scores = [
        ModuleScore(
            name=n,
            kind=n.rsplit(".", 1)[-1] if not n.endswith("base_layer") else n.rsplit(".", 2)[-2],
            layer=layer_index(n, layers_pattern),
            params=m.weight.numel(),
            fisher=float(fisher[i]) / seen,
            saliency=float(saliency[i]) / seen,
        )
        for i, (n, m) in enumerate(modules)
    ]
    return RelevanceReport(scores)


class RelevanceReport:
    """Per-module scores with rankings and proposals derived from them."""

    def __init__(self, modules: list[ModuleScore]) -> None:
        self.modules = modules

    def _check(self, score: str) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")

    def ranking(self, score: str = "fisher") -> list[ModuleScore]:
        self._check(score)
        return sorted(self.modules, key=lambda m: getattr(m, score), reverse=True)

    def by_layer(self, score: str = "fisher") -> dict[int, float]:
        self._check(score)
        out: dict[int, float] = {}
        for m in self.modules:
            if m.layer is not None:
                out[m.layer] = out.get(m.layer, 0.0) + getattr(m, score)
        return dict(sorted(out.items()))

    def by_kind(self, score: str = "fisher") -> dict[str, float]:
        self._check(score)
        out: dict[str, float] = {}
        for m in self.modules:
            out[m.kind] = out.get(m.kind, 0.0) + getattr(m, score)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def heatmap(self, score: str = "fisher") -> tuple[list[int], list[str], list[list[float]]]:
        """``(layers, kinds, matrix[layer][kind])`` of summed scores."""
        layers = sorted({m.layer for m in self.modules if m.layer is not None})
        kinds = sorted({m.kind for m in self.modules if m.layer is not None})
        grid = [[0.0] * len(kinds) for _ in layers]
        for m in self.modules:
            if m.layer is not None:
                grid[layers.index(m.layer)][kinds.index(m.kind)] += getattr(m, score)
        return layers, kinds, grid

    def lora_targets(self, share: float = 0.8, score: str = "fisher") -> list[str]:
        """The fewest modules (highest scores first) whose scores add up to ``share`` of the total."""
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        ranked = self.ranking(score)
        total = sum(getattr(m, score) for m in ranked) or 1.0
        chosen, acc = [], 0.0
        for m in ranked:
            chosen.append(m.name)
            acc += getattr(m, score)
            if acc >= share * total:
                break
        return chosen

    def rank_pattern(self, targets: list[str], mean_rank: int = 8, min_rank: int = 1, score: str = "fisher") -> dict[str, int]:
        """Ranks for ``targets`` proportional to their scores, averaging ``mean_rank``."""
        by_name = {m.name: getattr(m, score) for m in self.modules}
        values = [by_name[t] for t in targets]
        total = sum(values) or 1.0
        budget = mean_rank * len(targets)
        return {t: max(min_rank, round(budget * v / total)) for t, v in zip(targets, values, strict=True)}

    def proposal(self, share: float = 0.8, mean_rank: int = 8, top_layers: int = 2, score: str = "fisher") -> dict[str, Any]:
        """A run-config ``method`` section: LoRA on the modules that hold ``share`` of the
        score, ranks in proportion to it; and the ``top_layers`` blocks worth fine-tuning."""
        targets = self.lora_targets(share, score)
        return {"method": {"name": "lora", "target_modules": targets,
                           "rank_pattern": self.rank_pattern(targets, mean_rank, score=score)},
                "layers_for_partial_finetuning": self.top_layers(top_layers, score)}

    def top_layers(self, k: int, score: str = "fisher") -> list[int]:
        ranked = sorted(self.by_layer(score).items(), key=lambda kv: -kv[1])
        return sorted(layer for layer, _ in ranked[:k])

    def to_json(self) -> str:
        return json.dumps([asdict(m) for m in self.modules], indent=2)

    def table(self, score: str = "fisher", limit: int = 20) -> str:
        rows = self.ranking(score)[:limit]
        width = max(len(m.name) for m in rows)
        lines = [f"{'module':<{width}}  layer  {'fisher':>11}  {'saliency':>11}"]
        for m in rows:
            layer = "-" if m.layer is None else str(m.layer)
            lines.append(f"{m.name:<{width}}  {layer:>5}  {m.fisher:11.4e}  {m.saliency:11.4e}")
        return "\n".join(lines)

    def plot(self, path: str, score: str = "fisher") -> None:
        """Writes a heat map (layer × module kind) as PNG; needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from peftkit.core.io import atomic_write

        layers, kinds, grid = self.heatmap(score)
        if not layers:  # no repeated blocks found: one bar per module instead
            ranked = self.ranking(score)[:30]
            fig, ax = plt.subplots(figsize=(6, 1.2 + 0.3 * len(ranked)))
            ax.barh([m.name for m in reversed(ranked)], [getattr(m, score) for m in reversed(ranked)])
            ax.set_xlabel(score)
            ax.set_title(f"relevance ({score})")
        else:
            fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.45 * len(layers)))
            image = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), [str(x) for x in layers])
            ax.set_xlabel("module kind")
            ax.set_ylabel("layer")
            ax.set_title(f"relevance ({score})")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)
