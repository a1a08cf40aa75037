"""``peftkit compare``: every named method on the same model, data, seed and step budget,
then one report (terminal, Markdown, CSV, JSON, Pareto plots, HTML) and a recommendation.

Each method trains in its own process (``peftkit train``), so peak memory is that run's own
and a failing method (out of memory, not applicable to the model) is a row with its reason
while the others still run. Finished runs are reused when the same report is made again.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from peftkit.core.io import atomic_write_text
from peftkit.train.config import ConfigError

__all__ = ["PRESETS", "compare", "pareto_front", "recommend"]

# Sensible starting points; the config's `compare:` section overrides any of them per name.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"method": {"name": "full"}, "train": {"lr": 5e-5}},
    "lora": {"method": {"name": "lora", "r": 8, "lora_alpha": 16}, "train": {"lr": 1e-3}},
    "adaptive_lora": {"method": {"name": "lora", "r": 12, "lora_alpha": 24}, "train": {"lr": 1e-3, "adaptive_target_r": 4}},
    "dora": {"method": {"name": "lora", "r": 8, "lora_alpha": 16, "use_dora": True}, "train": {"lr": 1e-3}},
    "ia3": {"method": {"name": "ia3"}, "train": {"lr": 1e-2}},
    "bitfit": {"method": {"name": "bitfit"}, "train": {"lr": 1e-2}},
    "layernorm": {"method": {"name": "ln_tuning"}, "train": {"lr": 5e-3}},
    "adapter": {"method": {"name": "bottleneck"}, "train": {"lr": 1e-3}},
    "prompt": {"method": {"name": "prompt_tuning", "num_virtual_tokens": 20}, "train": {"lr": 3e-2}},
    "prefix": {"method": {"name": "prefix_tuning", "num_virtual_tokens": 20}, "train": {"lr": 1e-2}},
    "sparse": {"method": {"name": "sparse", "density": 0.01}, "train": {"lr": 1e-3}},
}
for _k in (1, 2, 3, 4):
    PRESETS[f"top{_k}"] = {"method": {"name": "layerwise", "top_layers": _k}, "train": {"lr": 1e-4}}

COLUMNS = ["method", "status", "metric", "trainable", "share", "peak_memory_mib", "train_seconds", "throughput", "adapter_bytes", "latency_ms", "note"]


@dataclass
class Row:
    method: str
    status: str
    metric: float | None = None
    trainable: int | None = None
    share: float | None = None
    peak_memory_mib: float | None = None
    train_seconds: float | None = None
    throughput: float | None = None
    adapter_bytes: int | None = None
    latency_ms: float | None = None
    note: str = ""


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _run_config(raw: dict[str, Any], name: str, out_dir: str) -> dict[str, Any]:
    """The run config of one method: the shared config, the preset's method and training
    settings, then the config's own ``compare.<name>`` section on top."""
    overrides = (raw.get("compare") or {}).get(name)
    if name not in PRESETS and overrides is None:
        raise ConfigError(f"unknown method {name!r} for compare: use one of {sorted(PRESETS)} or define it under compare.{name}")
    preset = PRESETS.get(name, {})
    cfg = {k: v for k, v in raw.items() if k != "compare"}
    cfg["method"] = dict(preset.get("method") or raw.get("method") or {})
    cfg["train"] = {**(raw.get("train") or {}), **preset.get("train", {})}
    if overrides:
        method = overrides.get("method")
        if isinstance(method, dict) and method.get("name") not in (None, cfg["method"].get("name")):
            cfg["method"] = {}  # another method: its options replace, not extend, the shared ones
        cfg = _merge(cfg, overrides)
    cfg["output_dir"] = os.path.join(out_dir, name)
    return cfg


def _latency_ms(run_dir: str) -> tuple[float | None, str]:
    """Forward latency on a batch of 8 of the run's own examples after merging (unmerged if
    the method cannot merge)."""
    import torch

    from peftkit.cli import _load_run

    run, model = _load_run(run_dir)
    note = ""
    try:
        model = model.merge_and_unload()
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        note = f"not mergeable ({exc.__class__.__name__}); latency unmerged"
    model.eval()
    records = run.task.read(run.cfg.data.validation or run.cfg.data.train, run.cfg.data)[:8]
    batch = run.collate(run.encode_all(records))
    times = []
    with torch.no_grad():
        for _ in range(10):  # the first passes pay one-time kernel set-up
            start = time.perf_counter()
            run.task.loss(model, batch)
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times[3:])[len(times[3:]) // 2], note


def _summary_metric(out_dir: str, name: str) -> str | None:
    try:
        with open(os.path.join(out_dir, name, "summary.json"), encoding="utf-8") as fh:
            return json.load(fh).get("metric")
    except (OSError, ValueError):
        return None


def _run_one(raw: dict[str, Any], name: str, out_dir: str, log: Any) -> Row:
    cfg = _run_config(raw, name, out_dir)
    run_dir = cfg["output_dir"]
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "compare_config.yaml")
    summary_path = os.path.join(run_dir, "summary.json")
    text = yaml.safe_dump(cfg, sort_keys=True)
    reuse = os.path.isfile(summary_path) and os.path.isfile(cfg_path) and open(cfg_path, encoding="utf-8").read() == text
    if reuse:
        log(f"[{name}] finished before; reusing {run_dir}")
    else:
        atomic_write_text(cfg_path, text)
        if os.path.exists(summary_path):
            os.remove(summary_path)
        log(f"[{name}] training ...")
        proc = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", cfg_path, "--quiet"], capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(summary_path):
            lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            log(f"[{name}] failed: {reason}")
            return Row(name, "failed", note=reason[:300])
    with open(summary_path, encoding="utf-8") as fh:
        summary = json.load(fh)
    from peftkit.train.tasks import get_task

    # the metric the run chose its checkpoint by (it may depend on the data, e.g. labels or not)
    metric_name = summary.get("metric") or (raw.get("train") or {}).get("metric") or get_task(raw.get("task", "classification")).default_metric
    after = summary.get("metric_after") or {}
    try:
        latency, note = _latency_ms(run_dir)
    except Exception as exc:
        latency, note = None, f"latency not measured: {exc}"
    return Row(
        name, "ok", after.get(metric_name), summary["trainable_parameters"], summary["trainable_share"],
        summary["peak_memory_bytes"] / 2**20, summary["train_seconds"], summary["throughput"],
        summary["adapter_bytes"], latency, note,
    )


def pareto_front(points: list[tuple[float, float]], higher_better: bool = True) -> list[int]:
    """Indices of points not dominated in (cost lower, metric better)."""
    front = []
    for i, (cost, metric) in enumerate(points):
        dominated = any(
            (c <= cost and (m >= metric if higher_better else m <= metric)) and (c < cost or m != metric)
            for j, (c, m) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def recommend(rows: list[Row], tolerance: float, higher_better: bool = True) -> Row | None:
    """The method with the fewest trainable parameters whose metric is within ``tolerance``
    of the best."""
    ok = [r for r in rows if r.status == "ok" and r.metric is not None]
    if not ok:
        return None
    best = max(r.metric for r in ok) if higher_better else min(r.metric for r in ok)
    near = [r for r in ok if (best - r.metric <= tolerance if higher_better else r.metric - best <= tolerance)]
    return min(near, key=lambda r: (r.trainable or 0, r.peak_memory_mib or 0))


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "share":
        return f"{100 * value:.3f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _markdown(rows: list[Row], metric: str) -> str:
    head = ["method", metric, "trainable", "share", "peak MiB", "train s", "throughput", "adapter bytes", "latency ms", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, _fmt(r.metric), _fmt(r.trainable), _fmt(r.share, "share"), _fmt(r.peak_memory_mib), _fmt(r.train_seconds),
                 _fmt(r.throughput), _fmt(r.adapter_bytes), _fmt(r.latency_ms), (r.note if r.status == "ok" else f"failed: {r.note}").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(rows: list[Row], out_dir: str, metric: str, higher_better: bool) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from peftkit.core.io import atomic_write

    ok = [r for r in rows if r.status == "ok" and r.metric is not None]
    paths = []
    for name, attr, label, log in (("pareto.png", "trainable", "trainable parameters (log)", True), ("memory.png", "peak_memory_mib", "peak memory (MiB)", False)):
        fig, ax = plt.subplots(figsize=(6, 4))
        points = [(float(getattr(r, attr) or 0), float(r.metric)) for r in ok]
        for r, (x, y) in zip(ok, points, strict=True):
            ax.scatter([x], [y])
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(4, 4))
        front = pareto_front(points, higher_better)
        if len(front) > 1:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", label="Pareto front")
            ax.legend()
        if log and all(x > 0 for x, _ in points):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {label.split(' (')[0]}")
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        paths.append(path)
    return paths


def compare(config_path: str, methods: list[str], out_dir: str | None = None, tolerance: float = 0.01,
            overrides: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Trains each of ``methods`` with the run config at ``config_path`` and writes the report.

    Returns:
        ``{"rows": [...], "recommendation": name or None, "files": [...]}``.
    """
    from peftkit.train.config import apply_overrides, build_config
    from peftkit.train.evaluate import metric_direction

    log = (lambda *a: None) if quiet else print
    with open(config_path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    raw = apply_overrides(raw, overrides or [])
    base_dir = os.path.dirname(os.path.abspath(config_path))
    checked = build_config({k: v for k, v in raw.items() if k != "compare"}, base_dir=base_dir)  # fail fast on the shared part
    # paths resolved next to the config file, so each method's own config finds them
    raw["data"] = {**raw.get("data", {}), "train": checked.data.train, "validation": checked.data.validation}
    raw["model"] = {**(raw.get("model") or {}), "name": checked.model.name}
    if checked.model.checkpoint:
        raw["model"]["checkpoint"] = checked.model.checkpoint
    out_dir = out_dir or os.path.join(checked.output_dir, "compare")
    os.makedirs(out_dir, exist_ok=True)
    from peftkit.train.tasks import get_task

    rows = [_run_one(raw, name, out_dir, log) for name in methods]
    chosen = [_summary_metric(out_dir, r.method) for r in rows if r.status == "ok"]
    metric = checked.train.metric or next((m for m in chosen if m), None) or get_task(checked.task).default_metric
    higher = metric_direction(metric)
    best = recommend(rows, tolerance, higher)
    table = _markdown(rows, metric)
    verdict = (f"Recommendation: **{best.method}** — the fewest trainable parameters within {tolerance} {metric} of the best."
               if best else "No method finished; nothing to recommend.")
    files = []
    md_path = os.path.join(out_dir, "compare.md")
    atomic_write_text(md_path, f"# Method comparison\n\n{table}\n{verdict}\n")
    csv_buf = io.StringIO()
    writer = csv.writer(csv_buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([getattr(r, c) if getattr(r, c) is not None else "" for c in COLUMNS])
    csv_path = os.path.join(out_dir, "compare.csv")
    atomic_write_text(csv_path, csv_buf.getvalue())
    json_path = os.path.join(out_dir, "compare.json")
    atomic_write_text(json_path, json.dumps({"metric": metric, "rows": [r.__dict__ for r in rows], "recommendation": best.method if best else None}, indent=2) + "\n")
    pngs = _plots(rows, out_dir, metric, higher)
    images = "".join(f'<img alt="{os.path.basename(p)}" src="data:image/png;base64,{base64.b64encode(open(p, "rb").read()).decode()}">' for p in pngs)
    html_rows = "".join("<tr>" + "".join(f"<td>{_fmt(getattr(r, c), 'share' if c == 'share' else '')}</td>" for c in COLUMNS) + "</tr>" for r in rows)
    html = (f"<!doctype html><meta charset='utf-8'><title>peftkit compare</title><h1>Method comparison ({metric})</h1>"
            f"<table border=1 cellpadding=4><tr>{''.join(f'<th>{c}</th>' for c in COLUMNS)}</tr>{html_rows}</table>"
            f"<p>{verdict.replace('**', '')}</p>{images}")
    html_path = os.path.join(out_dir, "compare.html")
    atomic_write_text(html_path, html)
    files += [md_path, csv_path, json_path, html_path, *pngs]
    log("\n" + table + "\n" + verdict.replace("**", ""))
    return {"rows": rows, "recommendation": best.method if best else None, "files": files}
