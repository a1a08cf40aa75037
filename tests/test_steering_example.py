"""The sentiment-steering example (examples/preference/steering.py), shortened: every step
of the experiment runs — data, tokenizer, pre-training, the judge, DPO on SST-2 pairs and on
the writer's own judged samples, GRPO, evaluation —
with a 0.4 M-parameter writer, a judge trained on 1,024 sentences and a few dozen steps of
each tuning run. At this size the writer is barely past word frequencies and the judge
rates nearly every text alike, so the test asks what each stage can show here (pre-training
and the judge improve on their start, DPO's margin grows, GRPO's rows carry their metrics,
the tuned models differ from the reference); whether the steering works is measured at full
size (BENCHMARKS.md)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from peftkit.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "datasets" / "sst2"
pytestmark = pytest.mark.skipif(not SST2.is_dir(), reason="../shared/datasets/sst2 not present")


def _steering():
    spec = importlib.util.spec_from_file_location("steering", REPO / "examples" / "preference" / "steering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_steering_shortened(tmp_path):
    steering = _steering()
    steering.prepare(str(tmp_path), pairs=512, seed=0)
    pairs = _rows(tmp_path / "pairs.jsonl")
    assert len(pairs) + len(_rows(tmp_path / "pairs_val.jsonl")) == 512
    assert all(p["prompt"] and p["chosen"].strip() and p["rejected"].strip() for p in pairs)
    assert len(_rows(tmp_path / "val_prompts.jsonl")) == 256

    lm = steering.pretrain(str(tmp_path), steps=200, size="tiny", seed=0)
    vocab = 4096
    assert lm["validation_perplexity"] < vocab / 2  # far from uniform: it learnt the words' frequencies at least

    judge = ["train", str(tmp_path / "sentiment.yaml"), "--quiet", "data.max_train_examples=1024", "data.max_eval_examples=256"]
    assert cli_main(judge) == 0
    summary = json.loads((tmp_path / "sentiment" / "summary.json").read_text())
    assert summary["metric_after"]["accuracy"] > summary["metric_before"]["accuracy"] + 0.05

    assert cli_main(["train", str(tmp_path / "dpo.yaml"), "--quiet"]) == 0
    dpo = _rows(tmp_path / "dpo" / "metrics.jsonl")
    train_rows = [r for r in dpo if "loss" in r]
    assert train_rows[-1]["rewards/margins"] > train_rows[0]["rewards/margins"]

    # pairs from the writer's own samples, ranked by the judge
    kept = steering.sampled_pairs(str(tmp_path), per_prompt=4, margin=0.0, seed=0, new_tokens=16, limit=96)
    sampled = _rows(tmp_path / "pairs_sampled.jsonl") + _rows(tmp_path / "pairs_sampled_val.jsonl")
    assert 0 < kept == len(sampled) <= 96
    assert all(p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"] and p["margin"] >= 0 for p in sampled)
    assert cli_main(["train", str(tmp_path / "dpo_sampled.yaml"), "--quiet", "train.max_steps=6"]) == 0
    assert [r for r in _rows(tmp_path / "dpo_sampled" / "metrics.jsonl") if "loss" in r]
    # the next round samples from that run's merged model and trains a new LoRA on it
    assert steering.sampled_pairs(str(tmp_path), per_prompt=4, margin=0.0, seed=1, new_tokens=16, limit=64,
                                  policy="dpo_sampled") > 0
    assert (tmp_path / "dpo_sampled" / "merged" / "config.json").is_file()
    assert cli_main(["train", str(tmp_path / "dpo_sampled_next.yaml"), "--quiet", "train.max_steps=4"]) == 0
    next_cfg = yaml.safe_load((tmp_path / "dpo_sampled_next" / "config.yaml").read_text())
    assert next_cfg["model"]["name"] == str(tmp_path / "dpo_sampled" / "merged")

    grpo = ["train", str(tmp_path / "grpo.yaml"), "--quiet", "train.max_steps=30", "train.eval_every=30"]
    assert cli_main(grpo) == 0
    grpo_rows = [r for r in _rows(tmp_path / "grpo" / "metrics.jsonl") if "loss" in r]
    assert grpo_rows[-1]["step"] == 30
    assert all({"reward", "reward_std", "kl", "completions/mean_length"} <= set(r) for r in grpo_rows)
    assert all(0.0 <= r["reward"] <= 1.0 and r["completions/mean_length"] > 0 for r in grpo_rows)

    report = steering.evaluate(str(tmp_path), ["dpo", "grpo", "dpo_sampled_next"], seed=0, new_tokens=16, limit=64)
    for name in ("reference", "dpo", "grpo", "dpo_sampled_next"):
        row = report[name]
        assert row["samples"] == 64
        assert 0.0 <= row["positive_share"] <= 1.0 and 0.0 <= row["mean_reward"] <= 1.0
        assert math.isfinite(row["reference_perplexity"]) and row["reference_perplexity"] > 1.0
    assert abs(report["reference"]["kl_to_reference"]) < 1e-4  # the reference against itself
    for name in ("dpo", "grpo"):  # the adapters changed what the model writes
        assert abs(report[name]["kl_to_reference"]) > 1e-3
    assert json.loads((tmp_path / "steering_report.json").read_text()) == report
