"""Validation metrics: accuracy and macro-F1 for classification, loss and perplexity for
language modelling."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["classification_metrics", "evaluate", "metric_direction"]

_LOWER_IS_BETTER = ("eval_loss", "perplexity")


def metric_direction(name: str) -> bool:
    """True when a higher value is better."""
    return name not in _LOWER_IS_BETTER


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    accuracy = float((pred == gold).float().mean()) if len(gold) else 0.0
    f1s = []
    for c in torch.unique(torch.cat([pred, gold])):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    return {"accuracy": accuracy, "f1": sum(f1s) / max(1, len(f1s))}


@torch.no_grad()
def evaluate(model: Any, items: list[dict[str, Any]], collate: Any, cfg: Any, accelerator: Any = None) -> dict[str, float]:
    """Metrics of ``model`` on encoded ``items`` (each process takes a shard; results gathered)."""
    was_training = model.training
    model.eval()
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    device = accelerator.device if accelerator else next(model.parameters()).device
    shard = items[rank::world]
    size = cfg.train.eval_batch_size
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    preds, golds = [], []
    for start in range(0, len(shard), size):
        batch = {k: v.to(device) for k, v in collate(shard[start : start + size]).items()}
        out = model(**batch)
        if cfg.task == "classification":
            preds.append(out.logits.argmax(-1))
            golds.append(batch["labels"])
            loss_sum += float(out.loss) * len(batch["labels"])
            count += len(batch["labels"])
        else:
            tokens = int((batch["labels"] != -100).sum()) - (len(batch["labels"]) if cfg.task == "causal_lm" else 0)
            loss_sum += float(out.loss) * max(tokens, 1)
            count += max(tokens, 1)
    if accelerator is not None and world > 1:
        loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    result = {"eval_loss": float(loss_sum / count.clamp(min=1))}
    if cfg.task == "classification":
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
        gold = torch.cat(golds) if golds else torch.zeros(0, dtype=torch.long, device=device)
        if accelerator is not None and world > 1:
            pred, gold = accelerator.gather_for_metrics(pred), accelerator.gather_for_metrics(gold)
        result.update(classification_metrics(pred.cpu(), gold.cpu()))
    else:
        result["perplexity"] = math.exp(min(result["eval_loss"], 50.0))
    model.train(was_training)
    return result
