"""What a finished run shows a person: the summary table and the training curve."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_history", "summary_table"]


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
