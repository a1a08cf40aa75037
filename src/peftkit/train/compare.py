"""``peftkit compare``: every named method on the same model, data, seed and step budget,
then one report (terminal, Markdown, CSV, JSON, Pareto plots, HTML) and a recommendation.

Each method trains in its own process (``peftkit train``), so peak memory is that run's own
and a failing method (out of memory, not applicable to the model) is a row with its reason
while the others still run. Finished runs are reused when the same report is made again.
"""

from __future__ import annotations

import base64
import copy
import csv
import dataclasses
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
from peftkit.train.config import apply_overrides, build_config, read_raw_config
from peftkit.train.evaluate import metric_direction
from peftkit.train.plugins import get_task
from peftkit.train.run import load_run
from peftkit.train.schema import ConfigError

__all__ = ["compare", "pareto_front", "presets", "recommend", "run_config"]



def presets() -> dict[str, dict[str, Any]]:
    """Every method's named starting points (``Method.presets``), by name."""
    from peftkit.core.registry import all_methods

    return {name: preset for method in all_methods() for name, preset in method.presets.items()}


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


def _method_name(section: Any) -> str | None:
    name = section.get("name") if isinstance(section, dict) else section
    return str(name).upper().replace("-", "_") if name is not None else None


def run_config(raw: dict[str, Any], name: str, out_dir: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The run config of one method. Later layers win: the preset, the config file, the
    file's ``compare.<name>`` section, the command line's ``overrides``. The file's (and the
    command line's) ``method`` options apply only to runs of the same method."""
    from peftkit.train.config import apply_overrides

    table = presets()
    section = (raw.get("compare") or {}).get(name)
    if name not in table and section is None:
        raise ConfigError(f"unknown method {name!r} for compare: use one of {sorted(table)} or define it under compare.{name}")
    preset = table.get(name, {})
    shared = {k: v for k, v in raw.items() if k not in ("compare", "method")}
    cfg = _merge({"method": dict(preset.get("method") or raw.get("method") or {})}, {"train": dict(preset.get("train") or {})})
    cfg = _merge(cfg, shared)
    if _method_name(raw.get("method")) == _method_name(cfg["method"]):
        cfg["method"] = _merge(cfg["method"], raw.get("method") or {})
    if section:
        method = section.get("method")
        if isinstance(method, dict) and _method_name(method) not in (None, _method_name(cfg["method"])):
            cfg["method"] = {}  # another method: its options replace, not extend, the others
        cfg = _merge(cfg, section)
    same_method = _method_name(raw.get("method")) == _method_name(cfg["method"])
    cli = [o for o in overrides or [] if same_method or not o.strip().startswith("method.")]
    cfg = apply_overrides(cfg, cli)
    cfg["output_dir"] = os.path.join(out_dir, name)
    return cfg


def _latency_ms(run_dir: str) -> tuple[float | None, str]:
    """Forward latency on a batch of 8 of the run's own examples after merging (unmerged if
    the method cannot merge)."""
    import torch

    run, model = load_run(run_dir)
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


def _run_one(raw: dict[str, Any], name: str, out_dir: str, log: Any, overrides: list[str]) -> Row:
    cfg = run_config(raw, name, out_dir, overrides)
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
        proc = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", cfg_path, "--quiet", "--overwrite"], capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(summary_path):
            lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            log(f"[{name}] failed: {reason}")
            return Row(name, "failed", note=reason[:300])
    with open(summary_path, encoding="utf-8") as fh:
        summary = json.load(fh)
    metric_name = summary["metric"]  # the metric the run chose its checkpoint by (it may depend on the data)
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
    log = (lambda *a: None) if quiet else print
    raw, base_dir = read_raw_config(config_path)
    checked = build_config(apply_overrides(copy.deepcopy({k: v for k, v in raw.items() if k != "compare"}), overrides or []),
                           base_dir=base_dir)  # fail fast on the shared part
    for key in ("model", "data"):  # paths resolved next to the config file, for each method's own config
        section = getattr(checked, key)
        resolved = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.metadata.get("path") or f.name == "name"}
        raw[key] = {**(raw.get(key) or {}), **{k: v for k, v in resolved.items() if v or k in (raw.get(key) or {})}}
    raw["task"] = {**raw["task"], "name": checked.task} if isinstance(raw.get("task"), dict) else checked.task
    out_dir = out_dir or os.path.join(checked.output_dir, "compare")
    os.makedirs(out_dir, exist_ok=True)
    rows = [_run_one(raw, name, out_dir, log, overrides or []) for name in methods]
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
