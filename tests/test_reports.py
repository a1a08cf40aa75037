"""What a person sees: the training curve, the compare report's plots and latency figures,
and the relevance heat map's columns and proposal."""

from __future__ import annotations

import itertools

import pytest
import torch

from peftkit.analysis.relevance import module_kinds, relevance_scores
from peftkit.train.compare import (
    LATENCY_NOISE,
    Row,
    Timing,
    _frontier_figure,
    _latency_cell,
    _plots,
    _write_report,
    memory_differs,
    time_call,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from peftkit.train.report import history_figure, metric_limits, plot_history, summary_table  # noqa: E402

HISTORY = [
    *({"step": s, "loss": 0.7 - 0.006 * s, "lr": 1e-3} for s in range(10, 101, 10)),
    {"step": 50, "eval_loss": 0.24, "accuracy": 0.99, "f1": 0.99},
    {"step": 100, "eval_loss": 0.04, "accuracy": 1.0, "f1": 1.0},
]
BEFORE = {"eval_loss": 0.69, "accuracy": 0.58, "f1": 0.56}


# -- training curve ------------------------------------------------------------------------------
def _legend_texts(fig):
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_curve_has_one_legend_for_both_axes_and_the_step_zero_evaluation():
    fig = history_figure(HISTORY, "accuracy", before=BEFORE)
    try:
        assert _legend_texts(fig) == ["training loss", "validation loss", "validation accuracy"]
        loss_ax, metric_ax = fig.axes
        metric_line = metric_ax.get_lines()[0]
        assert list(metric_line.get_xdata()) == [0.0, 50.0, 100.0]  # the evaluation before training at step 0
        assert list(metric_line.get_ydata()) == [0.58, 0.99, 1.0]
        val_loss = next(line for line in loss_ax.get_lines() if line.get_label() == "validation loss")
        assert val_loss.get_xdata()[0] == 0.0 and val_loss.get_ydata()[0] == 0.69
        assert loss_ax.get_xlim()[0] < 0.0  # the step-0 marker is drawn whole
        assert loss_ax.get_ylim()[0] == 0.0
    finally:
        plt.close(fig)


def test_metric_axis_does_not_blow_up_a_small_change():
    history = [h for h in HISTORY if "loss" in h] + [{"step": 50, "accuracy": 0.999}, {"step": 100, "accuracy": 1.0}]
    fig = history_figure(history, "accuracy")  # no evaluation before training: the curve still draws
    try:
        low, high = fig.axes[1].get_ylim()
        assert low <= 0.0 and high >= 1.0  # accuracy gets its whole range, not 0.999-1.000
    finally:
        plt.close(fig)
    low, high = metric_limits([20.1, 20.0])  # a perplexity: at least 20% of its size
    assert high - low >= 0.2 * 20.1 and low <= 20.0 and high >= 20.1
    low, high = metric_limits([3.0, 1.2])
    assert low <= 1.2 and high >= 3.0 and low >= 0.0  # never below zero for a non-negative metric


def test_curve_of_a_loss_metric_draws_it_once(tmp_path):
    history = [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}, {"step": 20, "eval_loss": 1.7}]
    fig = history_figure(history, "eval_loss", before={"eval_loss": 2.5})
    try:
        assert len(fig.axes) == 1 and _legend_texts(fig) == ["training loss", "validation loss"]
    finally:
        plt.close(fig)
    plot_history(HISTORY, str(tmp_path / "curve.png"), "accuracy", before=BEFORE)
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not plt.get_fignums()  # every figure is closed


def test_summary_table_says_where_the_after_figures_come_from():
    summary = {"method": "lora", "steps": 100, "metric": "accuracy", "best_step": 50, "metric_before": {"accuracy": 0.58},
               "metric_after": {"eval_loss": 0.2, "accuracy": 0.99}, "trainable_parameters": 10, "total_parameters": 1000,
               "trainable_share": 0.01, "adapter_bytes": 2048, "wall_seconds": 12.9, "throughput": 2116.0,
               "throughput_unit": "tokens/s", "peak_memory_bytes": 560 * 2**20, "peak_memory_kind": "process_rss"}
    lines = dict(line.split(None, 1) for line in summary_table(summary).splitlines() if not line.startswith(("adapter", "wall", "peak")))
    assert lines["accuracy"] == "0.5800 -> 0.9900  (best checkpoint, step 50)"
    assert lines["eval_loss"] == "- -> 0.2000"  # no figure before training: a dash, not nan
    summary["best_step"] = 100
    assert "best checkpoint" not in summary_table(summary)


# -- compare: labels, frontier, memory, latency --------------------------------------------------
def _rows(memory=(563.0, 561.0, 580.0, 558.0, 559.0, 557.0, 570.0)):
    names = ["lora", "lora_r4", "dora", "ia3", "bitfit", "layernorm", "prefix"]
    trainable = [74498, 37634, 80642, 14594, 28418, 10754, 92160]
    metric = [1.0, 1.0, 0.995, 0.99, 0.99, 0.985, 0.93]
    return [Row(n, "ok", m, t, peak_memory_mib=mem) for n, m, t, mem in zip(names, metric, trainable, memory, strict=True)]


def _overlap(a, b):
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


@pytest.mark.parametrize("case", ["spread", "identical"])
def test_pareto_labels_do_not_overlap_each_other_or_the_points(case):
    rows = _rows()
    if case == "identical":  # four merged CNNs of the same size and accuracy, and two close by
        rows = [Row(f"cnn_{i}", "ok", 0.9, 1000) for i in range(4)] + [Row("near", "ok", 0.905, 1150), Row("far", "ok", 0.5, 10)]
    fig = _frontier_figure(rows, "trainable", "trainable parameters (log)", "accuracy", True, log=True)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        labels = [t for t in ax.texts]
        named = [n for t in labels for n in t.get_text().split(", ")]
        assert sorted(named) == sorted(r.method for r in rows)  # every method once; coinciding points share a label
        if case == "identical":
            assert "cnn_0, cnn_1, cnn_2, cnn_3" in [t.get_text() for t in labels]
        boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, without its leader line
        for a, b in itertools.combinations(boxes, 2):
            assert not _overlap(a, b)
        frame = ax.get_window_extent(renderer)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
        points = ax.transData.transform([(float(r.trainable), float(r.metric)) for r in rows])
        for box in boxes:
            assert not any(box.x0 < x < box.x1 and box.y0 < y < box.y1 for x, y in points)
        if case == "spread":
            front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
            # a staircase through layernorm (10,754), ia3 (14,594), lora_r4 (37,634)
            assert list(front.get_xdata()) == [10754, 14594, 14594, 37634, 37634]
            assert list(front.get_ydata()) == [0.985, 0.985, 0.99, 0.99, 1.0]
    finally:
        plt.close(fig)


def test_pareto_staircase_for_a_metric_where_lower_is_better():
    rows = [Row("a", "ok", 2.0, 10), Row("b", "ok", 1.5, 100), Row("c", "ok", 1.8, 1000), Row("d", "ok", 1.0, 10_000)]
    fig = _frontier_figure(rows, "trainable", "trainable parameters (log)", "eval_loss", False, log=True)
    try:
        front = next(line for line in fig.axes[0].get_lines() if line.get_label() == "Pareto front")
        assert list(front.get_xdata()) == [10, 100, 100, 10_000, 10_000]  # c is dominated by b
        assert list(front.get_ydata()) == [2.0, 2.0, 1.5, 1.5, 1.0]
    finally:
        plt.close(fig)


def test_memory_plot_only_where_methods_differ_beyond_noise(tmp_path):
    close = _rows()  # 557-580 MiB: 4% of the median
    drawn, why = memory_differs(close)
    assert not drawn and "noise" in why and "557-580 MiB" in why
    paths, notes = _plots(close, str(tmp_path), "accuracy", True)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["pareto.png"] and notes == [why]
    best, _ = _write_report(close, str(tmp_path), "accuracy", True, 0.01, lambda *a: None)
    assert best.method == "lora_r4"
    assert why in (tmp_path / "compare.md").read_text() and why in (tmp_path / "compare.html").read_text()
    full = [*close, Row("full", "ok", 1.0, 22_788_484, peak_memory_mib=900.0)]
    assert memory_differs(full) == (True, "")
    paths, notes = _plots(full, str(tmp_path), "accuracy", True)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["pareto.png", "memory.png"] and notes == []
    assert not memory_differs(close[:1])[0]  # one method: nothing to compare


class FakeClock:
    """A clock that each call of ``fn`` advances by the next of ``durations``."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, itertools.cycle(durations)

    def __call__(self):
        return self.now

    def fn(self):
        self.now += next(self.durations)


def test_latency_repeats_with_warmup_and_reports_the_median_and_spread():
    clock = FakeClock([0.030])
    timing = time_call(clock.fn, clock=clock)
    assert timing.runs >= 30 and clock.now >= 0.25 + 1.0  # a quarter second of warm-up, then at least a second
    assert timing.median_ms == pytest.approx(30.0) and timing.iqr_ms == pytest.approx(0.0) and not timing.noisy
    busy = FakeClock([0.026, 0.030, 0.120, 0.320])  # what four identical CNNs measured on a loaded machine
    timing = time_call(busy.fn, clock=busy)
    assert timing.noisy and timing.spread > LATENCY_NOISE
    slow = FakeClock([2.0])  # a slow model stops at the time cap, with at least 5 passes
    timing = time_call(slow.fn, clock=slow)
    assert timing.runs == 8 and timing.median_ms == pytest.approx(2000.0)


def test_noisy_latency_is_marked_in_the_report(tmp_path):
    assert Timing(30.0, 3.0, 40).spread == pytest.approx(0.1)
    quiet = Row("lora", "ok", 1.0, 10, latency_ms=30.0, latency_spread=0.1)
    noisy = Row("ia3", "ok", 1.0, 5, latency_ms=31.0, latency_spread=0.6)
    assert _latency_cell(quiet) == "30" and _latency_cell(noisy) == "31 (noisy, IQR 60%)"
    _write_report([quiet, noisy], str(tmp_path), "accuracy", True, 0.01, lambda *a: None)
    report = (tmp_path / "compare.md").read_text()
    assert "31 (noisy, IQR 60%)" in report and "| 30 |" in report
    assert "Latency of ia3 marked noisy" in report and "one CPU thread" in report
    assert "latency_spread" in (tmp_path / "compare.csv").read_text().splitlines()[0]


# -- relevance ------------------------------------------------------------------------------------
def test_module_kinds_tell_apart_layers_with_the_same_last_name():
    names = [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in (
        "attention.self.query", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")]
    names += ["bert.pooler.dense", "classifier", "model.layers.0.mlp.experts.3.w1", "model.layers.1.mlp.experts.0.w1"]
    kinds = module_kinds(names)
    assert kinds["bert.encoder.layer.0.attention.self.query"] == "query"
    assert kinds["bert.encoder.layer.1.attention.output.dense"] == "attention.output.dense"
    assert kinds["bert.encoder.layer.0.intermediate.dense"] == "intermediate.dense"
    assert kinds["bert.encoder.layer.0.output.dense"] == "output.dense"
    assert kinds["bert.pooler.dense"] == "bert.pooler.dense" and kinds["classifier"] == "classifier"  # outside the blocks
    assert kinds["model.layers.0.mlp.experts.3.w1"] == kinds["model.layers.1.mlp.experts.0.w1"] == "w1"
    assert module_kinds(["encoder.layer.0.output.dense.base_layer"]) == {"encoder.layer.0.output.dense.base_layer": "dense"}


def _bert_report(**kwargs):
    from models import build, inputs_for

    torch.manual_seed(0)
    model = build("bert")
    batches = [{**inputs_for("bert"), "labels": torch.tensor([0, 1, 1])}]
    return relevance_scores(model, batches, **kwargs)


def test_relevance_columns_are_distinct_layers_and_fresh_heads_are_not_proposed(tmp_path):
    pytest.importorskip("transformers")
    report = _bert_report()
    layers, kinds, grid = report.heatmap()
    assert kinds == ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert layers == [0, 1] and all(len(row) == len(kinds) for row in grid)
    assert "classifier" in {m.name for m in report.modules}  # scored when nobody says it is fresh
    report = _bert_report(exclude=["classifier", "pooler"])
    names = {m.name for m in report.modules}
    assert "classifier" not in names and "bert.pooler.dense" not in names
    assert report.excluded == ["bert.pooler.dense", "classifier"]
    proposal = report.proposal(share=1.0)
    assert all(t.startswith("bert.encoder.layer.") for t in proposal["method"]["target_modules"])
    assert "not scored" in report.table() and "classifier" in report.table()
    with pytest.raises(ValueError, match="outside"):
        _bert_report(exclude=["bert", "classifier"])
    report.plot(str(tmp_path / "heat.png"))
    fig_labels_ok = (tmp_path / "heat.png").stat().st_size > 1000
    assert fig_labels_ok
