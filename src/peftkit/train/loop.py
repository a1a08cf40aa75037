"""The training loop of ``peftkit train``: plain, readable top to bottom, on accelerate.

One global batch is cut into equal shards, one per process, so a run on N processes
(``accelerate launch`` / ``torchrun``, DDP) takes the same optimiser steps as one process
with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.core.io import WEIGHTS_NAME, atomic_write_text, save_tensors
from peftkit.train.config import RunConfig, method_config
from peftkit.train.data import batch_order, prepare_task_data
from peftkit.train.evaluate import metric_direction
from peftkit.train.tasks import Prepared
from peftkit.train.tasks.base import to_device

__all__ = ["run_training"]

CHECKPOINT = "checkpoint"


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms or other 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _regulariser(named: list[tuple[str, nn.Parameter]], reference: dict[str, torch.Tensor], cfg: RunConfig) -> torch.Tensor | None:
    t = cfg.train
    if not (t.l1 or t.l2 or t.l2sp):
        return None
    total = None
    for name, p in named:
        term = 0.0
        if t.l1:
            term = term + t.l1 * p.abs().sum()
        if t.l2:
            term = term + t.l2 * p.pow(2).sum()
        if t.l2sp:
            term = term + t.l2sp * (p - reference[name]).pow(2).sum()
        total = term if total is None else total + term
    return total


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _save_checkpoint(path: str, trainable: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_tensors(os.path.join(tmp, "trainable.safetensors"), trainable)
    torch.save(state, os.path.join(tmp, "state.pt"))
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class _Progress:
    def __init__(self, total: int, enabled: bool, unit: str) -> None:
        self.total, self.enabled, self.tty, self.unit = total, enabled, sys.stdout.isatty(), unit

    def show(self, step: int, loss: float, lr: float, rate: float) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * step / max(1, self.total))
        line = f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} {self.unit}/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print()


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False, _interrupt_at: int | None = None) -> dict[str, Any]:
    """Fine-tunes the configured model with the configured method; writes the output folder.

    Returns:
        The run summary (also written to ``summary.json``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    mixed = t.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    log = (lambda *a: None) if quiet or not main else print
    set_seed(t.seed)
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # this run's peak, not an earlier run's in the same process

    data = prepare_task_data(cfg.task, cfg.data, t.seed)
    peft_config = method_config(cfg)
    run = Prepared(cfg, data.labels)
    task, model, collate = run.task, run.model, run.collate
    if t.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    from peftkit import get_peft_model

    model = get_peft_model(model, run.with_heads(peft_config))
    train_items = run.encode_all(data.train)
    val_items = run.encode_all(data.validation)
    lengths = [task.length(i) for i in train_items]

    world, rank = accelerator.num_processes, accelerator.process_index
    if t.batch_size % world:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the {world} processes")
    batches_per_epoch = math.ceil(len(train_items) / t.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // t.grad_accum)
    total_steps = t.max_steps or max(1, int(round(steps_per_epoch * t.epochs)))
    eval_every = t.eval_every or steps_per_epoch
    metric_name = run.metric
    higher_better = metric_direction(metric_name)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference = {n: p.detach().clone() for n, p in named} if t.l2sp else {}
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(t.schedule, int(t.warmup_ratio * total_steps), total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    allocator = None
    if t.adaptive_target_r:
        from peftkit.methods.lora.adaptive import RankAllocator

        allocator = RankAllocator(inner, t.adaptive_target_r, total_steps, interval=t.adaptive_interval)

    os.makedirs(cfg.output_dir, exist_ok=True)
    if main:
        atomic_write_text(os.path.join(cfg.output_dir, "labels.json"), json.dumps(data.labels) + "\n")
    ckpt_dir = os.path.join(cfg.output_dir, CHECKPOINT)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None, "bad_evals": 0,
                             "history": [], "units": 0, "train_seconds": 0.0, "metric_before": None}
    if resume and os.path.isdir(ckpt_dir):
        saved = load_tensors_file(os.path.join(ckpt_dir, "trainable.safetensors"))
        params = dict(inner.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        blob = torch.load(os.path.join(ckpt_dir, "state.pt"), weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng"])
        state = blob["state"]
        log(f"resumed from step {state['step']}")
    elif resume:
        log("no checkpoint found; starting from the beginning")

    if state["metric_before"] is None and val_items:
        state["metric_before"] = run.evaluate(inner, val_items, accelerator)
        log(f"before training: {_fmt(state['metric_before'])}")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if main and not resume and os.path.exists(metrics_path):
        os.remove(metrics_path)

    def write_metrics(row: dict[str, Any]) -> None:
        if main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def checkpoint() -> None:
        if main:
            trainable = {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}
            _save_checkpoint(ckpt_dir, trainable, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                                   "rng": torch.get_rng_state(), "state": state})
        accelerator.wait_for_everyone()

    best_dir = os.path.join(cfg.output_dir, "adapter")

    def save_adapter() -> None:
        inner.save_pretrained(best_dir)
        task.after_save(inner, best_dir, cfg)

    progress = _Progress(total_steps, main and not quiet, task.unit)
    model.train()
    window_loss, window_n = 0.0, 0
    interrupted = False
    try:
        while state["step"] < total_steps and not state.get("stopped_early"):
            order = batch_order(lengths, t.batch_size, t.seed, state["epoch"], t.group_by_length)
            usable = len(order) - len(order) % t.grad_accum
            micro = state["batch"]
            for batch_ids in order[micro:usable]:
                tick = time.perf_counter()
                shard = batch_ids[rank * len(batch_ids) // world:(rank + 1) * len(batch_ids) // world]
                batch = to_device(collate([train_items[i] for i in shard]), accelerator.device)
                boundary = (micro + 1) % t.grad_accum == 0
                ctx = accelerator.no_sync(model) if not boundary else _null()
                with ctx, accelerator.autocast():
                    loss = task.loss(model, batch)
                    reg = _regulariser(named, reference, cfg)
                    total = loss + reg if reg is not None else loss
                    accelerator.backward(total / t.grad_accum)
                micro += 1
                state["units"] += task.units(batch) * world
                window_loss += float(loss.detach())
                window_n += 1
                if boundary:
                    if t.max_grad_norm:
                        accelerator.clip_grad_norm_([p for _, p in named], t.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    if allocator is not None:
                        allocator.step(state["step"])
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    state["batch"] = micro
                state["train_seconds"] += time.perf_counter() - tick
                if boundary:
                    step = state["step"]
                    if step % t.log_every == 0 or step == total_steps:
                        lr = scheduler.get_last_lr()[0]
                        tok_s = state["units"] / max(state["train_seconds"], 1e-9)
                        row = {"step": step, "loss": window_loss / window_n, "lr": lr, f"{task.unit}_per_second": tok_s}
                        state["history"].append(row)
                        write_metrics(row)
                        progress.show(step, row["loss"], lr, tok_s)
                        window_loss, window_n = 0.0, 0
                    if val_items and (step % eval_every == 0 or step == total_steps):
                        result = run.evaluate(inner, val_items, accelerator)
                        model.train()
                        write_metrics({"step": step, **result})
                        state["history"].append({"step": step, **result})
                        value = result[metric_name]
                        better = state["best"] is None or (value > state["best"] if higher_better else value < state["best"])
                        if better:
                            state["best"], state["best_step"], state["bad_evals"] = value, step, 0
                            if main:
                                save_adapter()
                        else:
                            state["bad_evals"] += 1
                        progress.close()
                        log(f"step {step}: {_fmt(result)}" + ("  (best)" if better else ""))
                        checkpoint()
                        if t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience:
                            log(f"early stopping: {metric_name} did not improve in {state['bad_evals']} evaluations")
                            state["stopped_early"] = True
                    elif t.checkpoint_every and step % t.checkpoint_every == 0:
                        checkpoint()
                    if _interrupt_at is not None and step == _interrupt_at:
                        raise KeyboardInterrupt
                    if state["step"] >= total_steps or state.get("stopped_early"):
                        break
            else:
                state["epoch"] += 1
                state["batch"] = 0
                continue
            break
    except KeyboardInterrupt:
        interrupted = True
        progress.close()
        log("interrupted: saving a checkpoint (continue with --resume)")
        checkpoint()
    progress.close()
    if interrupted:
        return {"interrupted": True, "step": state["step"]}

    if allocator is not None:
        # the run ends at its rank budget: the adapter saved is the final, pruned one
        ranks = allocator.finalize()
        log(f"adaptive LoRA: {sum(ranks.values())} rank components over {len(ranks)} modules")
        state["best_step"] = state["step"]
        if val_items:
            result = run.evaluate(inner, val_items, accelerator)
            state["history"].append({"step": state["step"], **result})
            write_metrics({"step": state["step"], **result})
        if main:
            save_adapter()
    elif not val_items or state["best"] is None:
        if main:
            save_adapter()
    checkpoint()
    summary = _summary(cfg, inner, state, best_dir, started, accelerator, task.unit, metric_name)
    if main:
        atomic_write_text(os.path.join(cfg.output_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
        import yaml

        atomic_write_text(os.path.join(cfg.output_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _plot(state["history"], os.path.join(cfg.output_dir, "training_curve.png"), metric_name)
        log(_table(summary))
    return summary


def load_tensors_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fmt(result: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in result.items())


def _summary(cfg: RunConfig, model: Any, state: dict[str, Any], adapter_dir: str, started: float, accelerator: Any,
             unit: str, metric: str) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    adapter_bytes = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir) if f == WEIGHTS_NAME) if os.path.isdir(adapter_dir) else 0
    after = next((h for h in reversed(state["history"]) if h.get("step") == state["best_step"] and "loss" not in h), None)
    after = {k: v for k, v in after.items() if k != "step"} if after else None
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss_bytes()
    return {
        "task": cfg.task,
        "model": cfg.model.name,
        "method": cfg.method.get("name"),
        "steps": state["step"],
        "metric": metric,
        "metric_before": state["metric_before"],
        "metric_after": after,
        "best_step": state["best_step"],
        "stopped_early": bool(state.get("stopped_early")),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / max(1, total),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda_allocated" if torch.cuda.is_available() else "process_rss",
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": state["train_seconds"],
        "throughput": state["units"] / max(state["train_seconds"], 1e-9),
        "throughput_unit": f"{unit}/s",
        "adapter_bytes": adapter_bytes,
        "processes": accelerator.num_processes,
    }


def _table(s: dict[str, Any]) -> str:
    before, after = s["metric_before"] or {}, s["metric_after"] or {}
    rows = [("method", str(s["method"])), ("steps", str(s["steps"]))]
    for key in after:
        rows.append((key, f"{before.get(key, float('nan')):.4f} -> {after[key]:.4f}"))
    rows += [
        ("trainable", f"{s['trainable_parameters']:,} / {s['total_parameters']:,} ({100 * s['trainable_share']:.3f}%)"),
        ("adapter size", f"{s['adapter_bytes'] / 1024:.1f} KiB"),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
        ("throughput", f"{s['throughput']:,.1f} {s['throughput_unit']}"),
        ("peak memory", f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB ({s['peak_memory_kind']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _plot(history: list[dict[str, Any]], path: str, metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from peftkit.core.io import atomic_write

    train = [h for h in history if "loss" in h]
    evals = [h for h in history if metric in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        other = ax.twinx()
        other.plot([h["step"] for h in evals], [h[metric] for h in evals], "o-", color="tab:orange", label=metric)
        other.set_ylabel(metric)
    ax.set_title("training curve")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
