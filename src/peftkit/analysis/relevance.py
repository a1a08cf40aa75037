"""Which modules and layers matter for a task: gradient-based relevance scores.

For every weight matrix ``W`` of a candidate module, over a sample of batches:
- Fisher (diagonal, empirical): ``F = Σ_batches Σ_ij (∂L/∂W_ij)²``
- saliency: ``S = Σ_batches Σ_ij |∂L/∂W_ij · W_ij|`` (first-order estimate of the loss change
  if the weight were removed).
Scores are summed per module, then per layer (block index) and per module kind (the
module's place inside its block, shortened to the fewest trailing parts that tell it from the
block's other modules: ``query``, ``q_proj``, but ``attention.output.dense``,
``intermediate.dense`` and ``output.dense`` for BERT's three ``dense`` layers; a module outside
the blocks is its own kind). From them the report proposes LoRA targets covering a share of
the total score, a rank pattern, or the layers to fine-tune.

Modules the task builds fresh (a classification head not in the checkpoint) are left out with
``exclude``: their random weights have large gradients that say nothing about where the
pretrained model needs adapting, and the run trains them in full anyway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.targeting import _DEFAULT_LAYER_PATTERNS, layer_index, name_matches
from peftkit.integrations.transformers import is_linear_like

__all__ = ["ModuleScore", "RelevanceReport", "module_kinds", "relevance_scores"]

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
    exclude: Iterable[str] = (),
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
        exclude: modules not to score nor propose, with everything inside them: the task's
            freshly initialised heads (``task.head_modules(...)``, the classifier of a
            ``SEQ_CLS`` model). An entry matches a module's full name or a suffix of it at a
            dot (as ``modules_to_save`` does).

    Returns:
        A :class:`RelevanceReport`.
    """
    is_candidate = is_candidate or _adaptable
    excluded_entries = [exclude] if isinstance(exclude, str) else list(exclude)
    modules, excluded = [], []
    for n, m in model.named_modules():
        if not n or not is_candidate(m) or getattr(m, "weight", None) is None:
            continue
        (excluded if _inside_any(n, excluded_entries) else modules).append((n, m))
    if not modules:
        raise ValueError("no candidate module with a weight found in the model" + (f" outside {excluded_entries}" if excluded else ""))
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
    kinds = module_kinds([n for n, _ in modules], layers_pattern)
    scores = [
        ModuleScore(
            name=n,
            kind=kinds[n],
            layer=layer_index(n, layers_pattern),
            params=m.weight.numel(),
            fisher=float(fisher[i]) / seen,
            saliency=float(saliency[i]) / seen,
        )
        for i, (n, m) in enumerate(modules)
    ]
    return RelevanceReport(scores, excluded=[n for n, _ in excluded])


def _inside_any(name: str, entries: list[str]) -> bool:
    """``name`` or a module containing it matches one of ``entries``."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:k]), e) for e in entries for k in range(1, len(parts) + 1))


def _in_block(name: str, layers_pattern: str | None) -> str | None:
    """The part of ``name`` after its block index (``encoder.layer.3.attention.self.query``
    -> ``attention.self.query``), further indices as ``*`` (the experts of a mixture); None
    outside the blocks."""
    for pattern in [layers_pattern] if layers_pattern else _DEFAULT_LAYER_PATTERNS:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.\d+(?:\.|$)", name)
        if m:
            rest = name[m.end():]
            return re.sub(r"(?<![^.])\d+(?![^.])", "*", rest) if rest else pattern.rsplit(".", 1)[-1]  # the block itself
    return None


def module_kinds(names: list[str], layers_pattern: str | None = None) -> dict[str, str]:
    """The kind of each module: its place inside its block, shortened to the fewest trailing
    parts that no other place in a block ends with (BERT: ``query``, ``attention.output.dense``,
    ``intermediate.dense``, ``output.dense``); a module outside the blocks keeps its name.
    Wrappers' ``.base_layer`` is dropped."""
    def clean(n: str) -> str:
        return n[: -len(".base_layer")] if n.endswith(".base_layer") else n

    places = {n: _in_block(clean(n), layers_pattern) for n in names}
    distinct = sorted({p for p in places.values() if p is not None})
    short: dict[str, str] = {}
    for place in distinct:
        parts = place.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if k == len(parts) or not any(o != place and name_matches(o, suffix) for o in distinct):
                short[place] = suffix
                break
    return {n: short[p] if p is not None else clean(n) for n, p in places.items()}


class RelevanceReport:
    """Per-module scores with rankings and proposals derived from them."""

    def __init__(self, modules: list[ModuleScore], excluded: list[str] | None = None) -> None:
        self.modules = modules
        #: candidate modules left out (``exclude``: fresh heads): neither scored nor proposed
        self.excluded = list(excluded or [])

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
        """``(layers, kinds, matrix[layer][kind])`` of summed scores; kinds in model order."""
        layers = sorted({m.layer for m in self.modules if m.layer is not None})
        kinds = list(dict.fromkeys(m.kind for m in self.modules if m.layer is not None))
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
        if self.excluded:
            lines.append(f"not scored (built fresh for the task, trained in full): {', '.join(self.excluded)}")
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
            longest = max(len(k) for k in kinds)  # the tick labels, at 45°, need this much height
            fig, ax = plt.subplots(figsize=(2.4 + 0.7 * len(kinds), 1.6 + 0.3 * len(layers) + 0.065 * longest))
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
