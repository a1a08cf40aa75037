"""What a finished run shows a person: the summary table and the training curve."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch

from peftkit.core.io import WEIGHTS_NAME

__all__ = ["format_metrics", "peak_rss_bytes", "plot_history", "run_summary", "summary_table"]


def summary_table(s: dict[str, Any]) -> str:
    """The run summary as aligned lines: metrics before -> after, size, time, memory."""
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


def plot_history(history: list[dict[str, Any]], path: str, metric: str) -> None:
    """The training loss and the validation metric over the steps, as a PNG (nothing
    without matplotlib)."""
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


def format_metrics(result: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in result.items())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_summary(run: Any) -> dict[str, Any]:
    """What ``summary.json`` records of a finished run."""
    state, cfg = run.state, run.cfg
    adapter_dir = os.path.join(run.out, "adapter")
    trainable, total = run.model.get_nb_trainable_parameters()
    weights = os.path.join(adapter_dir, WEIGHTS_NAME)
    after = next((h for h in reversed(state.history) if h.get("step") == state.best_step and "loss" not in h), None)
    after = {k: v for k, v in after.items() if k != "step"} if after else None
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()
    return {
        "task": cfg.task,
        "model": cfg.model.name,
        "method": cfg.method.get("name"),
        "steps": state.step,
        "rounds": state.round + 1,
        "metric": run.metric,
        "metric_before": state.metric_before,
        "metric_after": after,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / max(1, total),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda_allocated" if torch.cuda.is_available() else "process_rss",
        "wall_seconds": time.perf_counter() - run.started,
        "train_seconds": state.train_seconds,
        "throughput": state.units / max(state.train_seconds, 1e-9),
        "throughput_unit": f"{run.task.unit}/s",
        "adapter_bytes": os.path.getsize(weights) if os.path.isfile(weights) else 0,
        "processes": run.accelerator.num_processes,
        "threads": torch.get_num_threads(),
    }
