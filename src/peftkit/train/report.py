"""What a finished run shows a person: the summary table and the training curve."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch

from peftkit.core.io import WEIGHTS_NAME

__all__ = ["format_metrics", "history_figure", "metric_limits", "peak_rss_bytes", "plot_history", "run_summary",
           "summary_table"]


def summary_table(s: dict[str, Any]) -> str:
    """The run summary as aligned lines: metrics before -> after, size, time, memory."""
    before, after = s["metric_before"] or {}, s["metric_after"] or {}
    rows = [("method", str(s["method"])), ("steps", str(s["steps"]))]
    best = s.get("best_step")
    for key in after:
        start = f"{before[key]:.4f}" if key in before else "-"
        mark = f"  (best checkpoint, step {best})" if key == s.get("metric") and best is not None and best != s["steps"] else ""
        rows.append((key, f"{start} -> {after[key]:.4f}{mark}"))
    rows += [
        ("trainable", f"{s['trainable_parameters']:,} / {s['total_parameters']:,} ({100 * s['trainable_share']:.3f}%)"),
        ("adapter size", f"{s['adapter_bytes'] / 1024:.1f} KiB"),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
        ("throughput", f"{s['throughput']:,.1f} {s['throughput_unit']}"),
        ("peak memory", f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB ({s['peak_memory_kind']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def metric_limits(values: list[float]) -> tuple[float, float]:
    """The y-range of a validation metric, wide enough that a small change looks small.

    Values that all lie in [0, 1] (accuracy, F1, a loss under 1) get the whole [0, 1] range;
    others a span of at least 20 % of their largest magnitude around their middle, so a
    perplexity going from 20.1 to 20.0 stays a flat line instead of filling the axis."""
    low, high = min(values), max(values)
    if low >= 0.0 and high <= 1.0:
        return -0.03, 1.03
    span = max(high - low, 0.2 * max(abs(low), abs(high)), 1e-12)
    middle = (low + high) / 2
    low, high = middle - 0.55 * span, middle + 0.55 * span
    if min(values) >= 0.0 and low < 0.0:  # a non-negative metric is not drawn below zero
        low, high = 0.0, high - low
    return low, high


def history_figure(history: list[dict[str, Any]], metric: str, before: dict[str, Any] | None = None) -> Any:
    """The training curve as a matplotlib figure (see :func:`plot_history`)."""
    import matplotlib.pyplot as plt

    before = before or {}
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "loss" not in h and (metric in h or "eval_loss" in h)]

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(0.0, float(before[key]))] if key in before else []
        points += [(float(h["step"]), float(h[key])) for h in evals if key in h]
        return [x for x, _ in points], [y for _, y in points]

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], color="tab:blue", label="training loss")
    steps, losses = series("eval_loss")
    if steps:
        ax.plot(steps, losses, "s--", color="tab:green", markersize=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    last = max([float(h["step"]) for h in history if "step" in h] + [1.0])
    ax.set_xlim(-0.03 * last, 1.03 * last)  # the step-0 point whole, not cut at the edge
    if all(y >= 0 for line in ax.get_lines() for y in line.get_ydata()):
        ax.set_ylim(bottom=0)
    axes = [ax]
    steps, values = series(metric)
    trained = [(float(h["step"]), float(h[metric])) for h in train if metric in h]  # a task's own training metric
    if (steps or trained) and metric != "eval_loss":
        other = ax.twinx()
        if trained:
            other.plot([x for x, _ in trained], [y for _, y in trained], color="tab:orange", alpha=0.45, linewidth=1,
                       label=f"training {metric}")
        if steps:
            other.plot(steps, values, "o-", color="tab:orange", label=f"validation {metric}")
        other.set_ylim(*metric_limits(values + [y for _, y in trained]))
        other.set_ylabel(metric)
        axes.append(other)
        if 0.0 in steps:
            other.annotate("before training", (0.0, values[0]), textcoords="offset points", xytext=(6, -12), fontsize=8, color="tab:orange")
    handles = [line for a in axes for line in a.get_lines()]
    # one legend for the lines of both axes, under the plot where it hides no line
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    ax.set_title("training curve")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_history(history: list[dict[str, Any]], path: str, metric: str, before: dict[str, Any] | None = None) -> None:
    """The training loss and the validation loss and metric over the steps, as a PNG
    (nothing without matplotlib).

    Args:
        history: the run's rows: ``{"step", "loss", ...}`` for training, ``{"step", metric,
            "eval_loss", ...}`` for evaluations.
        path: the PNG to write.
        metric: the validation metric drawn on the right-hand axis.
        before: the evaluation before training (``summary["metric_before"]``), drawn at step 0.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from peftkit.core.io import atomic_write

    fig = history_figure(history, metric, before)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
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
