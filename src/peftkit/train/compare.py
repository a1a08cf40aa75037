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
import itertools
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

__all__ = ["compare", "memory_differs", "pareto_front", "place_labels", "presets", "recommend", "run_config", "time_call"]



def presets() -> dict[str, dict[str, Any]]:
    """Every method's named starting points (``Method.presets``), by name."""
    from peftkit.core.registry import all_methods

    return {name: preset for method in all_methods() for name, preset in method.presets.items()}


COLUMNS = ["method", "status", "metric", "trainable", "share", "peak_memory_mib", "train_seconds", "throughput", "adapter_bytes",
           "latency_ms", "latency_spread", "note"]
#: memory.png is drawn only when the methods' peak memory differs by more than this share of
#: the median: a process's peak RSS varies by 1-2 % between identical runs on CPU (and every
#: method there carries the same interpreter, torch and frozen weights), so smaller
#: differences would be plotted noise.
MEMORY_NOISE = 0.05
#: a latency whose interquartile range exceeds this share of its median is reported as noisy.
LATENCY_NOISE = 0.2


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
    latency_spread: float | None = None  # interquartile range / median of the timed passes


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


@dataclass
class Timing:
    """Repeated wall-clock timings of one call."""

    median_ms: float
    iqr_ms: float
    runs: int

    @property
    def spread(self) -> float:
        """The interquartile range over the median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > LATENCY_NOISE


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def time_call(fn: Any, warmup: int = 3, warmup_seconds: float = 0.25, min_runs: int = 30, min_seconds: float = 1.0,
              max_seconds: float = 15.0, max_runs: int = 300, clock: Any = time.perf_counter) -> Timing:
    """Times ``fn()``: untimed calls first (one-time kernel set-up, caches, allocator), at least
    ``warmup`` of them over at least ``warmup_seconds``; then timed calls until there are
    ``min_runs`` of them over at least ``min_seconds``, or ``max_seconds`` have passed (with at
    least 5), or ``max_runs``. The median is the figure; the interquartile range says how far
    to trust it. The garbage collector is paused meanwhile."""
    import gc

    started, calls = clock(), 0
    while calls < warmup or clock() - started < warmup_seconds:
        fn()
        calls += 1
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    times: list[float] = []
    try:
        started = clock()
        while True:
            start = clock()
            fn()
            end = clock()
            times.append(end - start)
            elapsed = end - started
            if len(times) >= max_runs or (len(times) >= min_runs and elapsed >= min_seconds) or (len(times) >= 5 and elapsed >= max_seconds):
                break
    finally:
        if enabled:
            gc.enable()
    times.sort()
    return Timing(1000 * _quantile(times, 0.5), 1000 * (_quantile(times, 0.75) - _quantile(times, 0.25)), len(times))


LATENCY_METHOD = ("Latency: one forward pass on a batch of 8 validation examples, merged where the method can merge; the median "
                  "of at least 30 timed passes over at least a second, after a quarter second of warm-up, on one CPU thread (or the GPU).")


def _latency_ms(run_dir: str) -> tuple[float | None, float | None, str]:
    """Forward latency on a batch of 8 of the run's own examples after merging (unmerged if
    the method cannot merge): the median of repeated passes (:func:`time_call`), their spread
    (interquartile range / median; the report marks it noisy above :data:`LATENCY_NOISE`)
    and a note (not mergeable).

    On CPU it runs on one thread: every method is then timed alike whatever the machine's load
    (on a loaded 2-core machine MiniLM's median on two threads ranged 163-725 ms between
    repeats, on one thread 78-96 ms)."""
    import torch

    run, model = load_run(run_dir)
    notes = []
    try:
        model = model.merge_and_unload()
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        notes.append(f"not mergeable ({exc.__class__.__name__}); latency unmerged")
    model.eval()
    records = run.task.read(run.cfg.data.validation or run.cfg.data.train, run.cfg.data)[:8]
    batch = run.collate(run.encode_all(records))
    cuda = any(p.is_cuda for p in model.parameters())

    def forward() -> None:
        run.task.loss(model, batch)
        if cuda:
            torch.cuda.synchronize()

    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            timing = time_call(forward)
    finally:
        torch.set_num_threads(threads)
    return timing.median_ms, timing.spread, "; ".join(notes)


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
        latency, spread, note = _latency_ms(run_dir)
    except Exception as exc:
        latency, spread, note = None, None, f"latency not measured: {exc}"
    return Row(
        name, "ok", after.get(metric_name), summary["trainable_parameters"], summary["trainable_share"],
        summary["peak_memory_bytes"] / 2**20, summary["train_seconds"], summary["throughput"],
        summary["adapter_bytes"], latency, note, latency_spread=spread,
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
    if kind in ("share", "percent"):
        return f"{100 * value:.3f}%" if kind == "share" else f"{100 * value:.0f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _latency_cell(r: Row) -> str:
    """The latency figure, marked when its repeats spread too widely to trust it."""
    text = _fmt(r.latency_ms)
    if r.latency_ms is not None and r.latency_spread is not None and r.latency_spread > LATENCY_NOISE:
        text += f" (noisy, IQR {_fmt(r.latency_spread, 'percent')})"
    return text


def _markdown(rows: list[Row], metric: str) -> str:
    head = ["method", metric, "trainable", "share", "peak MiB", "train s", "throughput", "adapter bytes", "latency ms", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, _fmt(r.metric), _fmt(r.trainable), _fmt(r.share, "share"), _fmt(r.peak_memory_mib), _fmt(r.train_seconds),
                 _fmt(r.throughput), _fmt(r.adapter_bytes), _latency_cell(r), (r.note if r.status == "ok" else f"failed: {r.note}").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def memory_differs(rows: list[Row]) -> tuple[bool, str]:
    """Whether the methods' peak memory differs by more than measurement noise: the spread
    (largest minus smallest) over the median above :data:`MEMORY_NOISE`. Returns the answer and
    a sentence saying why, for the report."""
    values = sorted(r.peak_memory_mib for r in rows if r.status == "ok" and r.metric is not None and r.peak_memory_mib)
    if len(values) < 2:
        return False, "memory.png left out: fewer than two methods have a peak memory to compare."
    median = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    spread = (values[-1] - values[0]) / median
    if spread > MEMORY_NOISE:
        return True, ""
    return False, (f"memory.png left out: peak memory of every method lies within {values[0]:,.0f}-{values[-1]:,.0f} MiB, a spread of "
                   f"{100 * spread:.1f}% of the median, within measurement noise (drawn above {100 * MEMORY_NOISE:.0f}%).")


def _boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The overlapping area of two (x0, y0, x1, y1) boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _box_distance(box: tuple[float, float, float, float], x: float, y: float) -> float:
    """How far the point (x, y) lies from the box (0 inside)."""
    return float(max(box[0] - x, 0.0, x - box[2]) ** 2 + max(box[1] - y, 0.0, y - box[3]) ** 2) ** 0.5


# Directions tried around a point, nearest rings first: right, upper right, above, ... .
_DIRECTIONS = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
_RINGS = (7, 14, 24, 38, 56, 80)  # pixels from the point to the label's nearest edge


def _segment_boxes(xa: float, ya: float, xb: float, yb: float, half: float = 1.5) -> list[tuple[float, float, float, float]]:
    """A line segment (pixels) as a chain of small boxes, for overlap tests."""
    steps = max(1, int(max(abs(xb - xa), abs(yb - ya)) // 3))
    return [(xa + (xb - xa) * k / steps - half, ya + (yb - ya) * k / steps - half,
             xa + (xb - xa) * k / steps + half, ya + (yb - ya) * k / steps + half) for k in range(steps + 1)]


def _nearest_on_box(box: tuple[float, float, float, float], x: float, y: float) -> tuple[float, float]:
    return min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3])


def place_labels(ax: Any, points: list[tuple[float, float]], names: list[str], colors: list[str] | None = None) -> list[Any]:
    """Labels ``names`` next to ``points`` (data coordinates) so that no two labels overlap and
    no label covers a point or a line of the axes. Points that coincide on screen (within 3
    pixels) share one label, their names joined by commas. Each label takes the first
    position, in rings of growing distance around its point, that is free, inside the axes,
    nearer its own point than any other and reached by a leader line that crosses no label;
    failing that the position with the least overlap. Labels away from their point get a thin
    leader line. Call it once the axes' limits and the figure's layout are final.

    Returns:
        The annotations, one per group of coinciding points, left to right.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72.0  # offset points -> pixels
    frame = ax.get_window_extent(renderer)
    pixels = [tuple(float(v) for v in ax.transData.transform(p)) for p in points]
    groups: list[list[int]] = []
    for i in sorted(range(len(names)), key=lambda i: (pixels[i][0], -pixels[i][1])):
        home = next((g for g in groups if abs(pixels[g[0]][0] - pixels[i][0]) <= 3 and abs(pixels[g[0]][1] - pixels[i][1]) <= 3), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    anchors = [pixels[g[0]] for g in groups]
    radius = 6.0  # a marker of size 30 (points²) and a little air
    obstacles = [(x - radius, y - radius, x + radius, y + radius) for x, y in anchors]
    for line in ax.get_lines():
        xy = ax.transData.transform(list(zip(line.get_xdata(), line.get_ydata(), strict=True))) if len(line.get_xdata()) else []
        for (xa, ya), (xb, yb) in itertools.pairwise(xy):
            obstacles += _segment_boxes(xa, ya, xb, yb)
    placed: list[tuple[float, float, float, float]] = []
    texts = []
    for g, group in enumerate(groups):
        x, y = anchors[g]
        text = ", ".join(names[i] for i in group)
        color = colors[group[0]] if colors else "black"
        probe = ax.text(0, 0, text, fontsize=9)
        box = probe.get_window_extent(renderer)
        probe.remove()
        w, h = box.width, box.height
        best, best_cost = None, float("inf")
        for ring, r in enumerate(_RINGS):
            for dx, dy in _DIRECTIONS:
                cx, cy = x + dx * (r + w / 2), y + dy * (r + h / 2)
                cand = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                outside = (max(0.0, frame.x0 - cand[0]) + max(0.0, cand[2] - frame.x1)) * h + (max(0.0, frame.y0 - cand[1]) + max(0.0, cand[3] - frame.y1)) * w
                clash = sum(_boxes_overlap(cand, o) for o in placed) + sum(_boxes_overlap(cand, o) for o in obstacles)
                if r > _RINGS[1]:  # the leader line must not cross a label either
                    leader = _segment_boxes(x, y, *_nearest_on_box(cand, x, y), half=0.5)
                    clash += sum(_boxes_overlap(seg, o) for seg in leader[1:-1] for o in placed)
                own = _box_distance(cand, x, y)
                nearer = any(_box_distance(cand, px, py) < own for j, (px, py) in enumerate(anchors) if j != g)
                cost = 10 * (clash + outside) + ring + (len(_RINGS) if nearer else 0)  # a label nearest its own point
                if cost < best_cost:
                    best, best_cost = (cand, r), cost
            if best_cost < len(_RINGS):  # a free, unambiguous place in this ring: take the nearest ring
                break
        (x0, y0, x1, y1), r = best
        arrow = {"arrowstyle": "-", "color": "gray", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if r > _RINGS[1] else None
        texts.append(ax.annotate(text, points[group[0]], xytext=((x0 + x1) / 2 / scale - x / scale, (y0 + y1) / 2 / scale - y / scale),
                                 textcoords="offset points", ha="center", va="center", fontsize=9, color=color, arrowprops=arrow))
        placed.append((x0, y0, x1, y1))
        if arrow:
            obstacles += _segment_boxes(x, y, *_nearest_on_box((x0, y0, x1, y1), x, y), half=1.0)
    return texts


def _frontier_figure(ok: list[Row], attr: str, label: str, metric: str, higher_better: bool, log: bool) -> Any:
    """``metric`` against one cost of every finished method: the Pareto front (the best metric
    reachable at each cost) as a staircase through its methods, the others grey."""
    import matplotlib.pyplot as plt

    points = [(float(getattr(r, attr) or 0), float(r.metric)) for r in ok]
    front = pareto_front(points, higher_better)
    on_front = set(front)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = ["tab:blue" if i in on_front else "tab:gray" for i in range(len(ok))]
    ax.scatter([x for x, _ in points], [y for _, y in points], c=colors, s=30, zorder=3)
    xs, ys = [points[front[0]][0]], [points[front[0]][1]]
    for i in front[1:]:  # a staircase: the best metric stays until a costlier method beats it
        xs += [points[i][0], points[i][0]]
        ys += [ys[-1], points[i][1]]
    ax.plot(xs, ys, color="tab:blue", lw=1.2, alpha=0.7, zorder=2, label="Pareto front")
    if log and all(x > 0 for x, _ in points):
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.12)
    else:
        ax.margins(x=0.15, y=0.12)
    ax.set_xlabel(label)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {label.split(' (')[0]}")
    ax.scatter([], [], c="tab:gray", s=30, label="dominated")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    place_labels(ax, points, [r.method for r in ok], ["black" if i in on_front else "dimgray" for i in range(len(ok))])
    return fig


def _plots(rows: list[Row], out_dir: str, metric: str, higher_better: bool) -> tuple[list[str], list[str]]:
    """``pareto.png`` (metric against trainable parameters) and, where the methods' memory
    differs beyond noise (:func:`memory_differs`), ``memory.png``. Returns the paths written
    and notes for the report on figures left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["no plots: matplotlib is not installed."]
    from peftkit.core.io import atomic_write

    ok = [r for r in rows if r.status == "ok" and r.metric is not None]
    if not ok:
        return [], []
    figures = [("pareto.png", "trainable", "trainable parameters (log)", True)]
    draw_memory, why = memory_differs(rows)
    notes = [] if draw_memory else [why]
    if draw_memory:
        figures.append(("memory.png", "peak_memory_mib", "peak memory (MiB)", False))
    paths = []
    for name, attr, label, log in figures:
        fig = _frontier_figure(ok, attr, label, metric, higher_better, log)
        path = os.path.join(out_dir, name)
        try:
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        finally:
            plt.close(fig)
        paths.append(path)
    return paths, notes


def _latency_notes(rows: list[Row]) -> list[str]:
    """How latency was measured, and a warning where a figure is noisy."""
    measured = [r for r in rows if r.latency_ms is not None]
    notes = [LATENCY_METHOD] if measured else []
    noisy = [r.method for r in measured if r.latency_spread is not None and r.latency_spread > LATENCY_NOISE]
    if noisy:
        notes.append(f"Latency of {', '.join(noisy)} marked noisy: the interquartile range of its passes exceeds "
                     f"{100 * LATENCY_NOISE:.0f}% of the median (the machine was busy); rerun on an idle machine before comparing them.")
    return notes


def _write_report(rows: list[Row], out_dir: str, metric: str, higher: bool, tolerance: float, log: Any) -> tuple[Row | None, list[str]]:
    """compare.md, .csv, .json, .html and the plots. Returns the recommendation and the files."""
    best = recommend(rows, tolerance, higher)
    table = _markdown(rows, metric)
    verdict = (f"Recommendation: **{best.method}** — the fewest trainable parameters within {tolerance} {metric} of the best."
               if best else "No method finished; nothing to recommend.")
    pngs, notes = _plots(rows, out_dir, metric, higher)
    notes += _latency_notes(rows)
    md_path = os.path.join(out_dir, "compare.md")
    atomic_write_text(md_path, f"# Method comparison\n\n{table}\n{verdict}\n" + "".join(f"\n{n}\n" for n in notes))
    csv_buf = io.StringIO()
    writer = csv.writer(csv_buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([getattr(r, c) if getattr(r, c) is not None else "" for c in COLUMNS])
    csv_path = os.path.join(out_dir, "compare.csv")
    atomic_write_text(csv_path, csv_buf.getvalue())
    json_path = os.path.join(out_dir, "compare.json")
    atomic_write_text(json_path, json.dumps({"metric": metric, "rows": [r.__dict__ for r in rows], "recommendation": best.method if best else None,
                                             "notes": notes}, indent=2) + "\n")
    images = "".join(f'<img alt="{os.path.basename(p)}" src="data:image/png;base64,{base64.b64encode(open(p, "rb").read()).decode()}">' for p in pngs)
    kinds = {"share": "share", "latency_spread": "percent"}
    html_rows = "".join("<tr>" + "".join(f"<td>{_fmt(getattr(r, c), kinds.get(c, ''))}</td>" for c in COLUMNS) + "</tr>" for r in rows)
    html = (f"<!doctype html><meta charset='utf-8'><title>peftkit compare</title><h1>Method comparison ({metric})</h1>"
            f"<table border=1 cellpadding=4><tr>{''.join(f'<th>{c}</th>' for c in COLUMNS)}</tr>{html_rows}</table>"
            f"<p>{verdict.replace('**', '')}</p>{''.join(f'<p>{n}</p>' for n in notes)}{images}")
    html_path = os.path.join(out_dir, "compare.html")
    atomic_write_text(html_path, html)
    log("\n" + table + "\n" + verdict.replace("**", "") + "".join(f"\n{n}" for n in notes))
    return best, [md_path, csv_path, json_path, html_path, *pngs]


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
    best, files = _write_report(rows, out_dir, metric, higher, tolerance, log)
    return {"rows": rows, "recommendation": best.method if best else None, "files": files}
