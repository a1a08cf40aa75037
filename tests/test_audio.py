"""Audio classification in `peftkit train`: reading and resampling audio, batching, LoRA on a
tiny wav2vec 2.0 that learns low vs high tones, Whisper encoder classification, (IA)³ and
bottleneck adapters on speech encoders, prediction from the command line, and clear errors."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from peftkit.train import ConfigError, load_config, run_training
from peftkit.train.config import build_config
from peftkit.train.data import prepare_task_data
from peftkit.train.plugins import get_task
from peftkit.train.run import Prepared
from peftkit.train.tasks.audio import _read_wav_stdlib, load_audio, read_audio_file, resample

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_spec = importlib.util.spec_from_file_location("make_tones", EXAMPLES / "make_tones.py")
make_tones = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tones)


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """Low/high tone clips (16 kHz, every fifth at 22.05 or 8 kHz) and a tiny wav2vec 2.0."""
    root = tmp_path_factory.mktemp("tones")
    make_tones.write_tones(str(root / "train"), per_class=12, seed=0)
    make_tones.write_tones(str(root / "validation"), per_class=6, seed=1)
    make_tones.write_tiny_wav2vec2(str(root / "w2v"))
    return root


def _config(root: Path, out: Path, method: dict | None = None, **train) -> dict:
    return {
        "task": "audio_classification",
        "model": {"name": str(root / "w2v")},
        "data": {"train": str(root / "train"), "validation": str(root / "validation")},
        "method": method or {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]},
        "train": {"epochs": 1, "max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.1, "seed": 0,
                  "log_every": 5, "eval_every": 30, **train},
        "output_dir": str(out),
    }


def _sine(freq: float, rate: int, seconds: float) -> torch.Tensor:
    return torch.sin(2 * math.pi * freq * torch.arange(int(rate * seconds), dtype=torch.float64) / rate).float()


# -- resampling and reading ---------------------------------------------------------------
@pytest.mark.parametrize(("orig", "new", "freq"), [(22050, 16000, 440.0), (8000, 16000, 1000.0), (44100, 16000, 3000.0)])
def test_resampling_a_sine_keeps_its_frequency_and_amplitude(orig, new, freq):
    y = resample(_sine(freq, orig, 0.5), orig, new)
    assert len(y) == math.ceil(0.5 * orig * new / orig)
    middle = slice(len(y) // 8, -len(y) // 8)  # away from the ends, where the signal stops
    expected = _sine(freq, new, 0.5)[: len(y)]
    assert (y[middle] - expected[middle]).abs().max() < 1e-3
    segment = y[middle].double() * torch.hann_window(len(y[middle]), dtype=torch.float64)
    peak_hz = torch.fft.rfft(segment).abs().argmax().item() * new / len(segment)
    assert abs(peak_hz - freq) <= new / len(segment)
    assert y[middle].abs().max() == pytest.approx(1.0, abs=2e-3)


def test_downsampling_removes_what_the_new_rate_cannot_hold():
    # 7 kHz is above 4 kHz, the Nyquist frequency of 8 kHz: it must vanish, not alias to 1 kHz
    y = resample(_sine(7000.0, 22050, 0.5), 22050, 8000)
    assert y[500:-500].pow(2).mean().sqrt() < 0.01
    assert torch.equal(resample(_sine(100.0, 16000, 0.1), 16000, 16000), _sine(100.0, 16000, 0.1))


def test_stereo_files_are_mixed_down_and_the_stdlib_reader_matches_soundfile(tmp_path):
    left, right = _sine(500.0, 16000, 0.1).numpy(), 0.5 * _sine(900.0, 16000, 0.1).numpy()
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1), 16000, subtype="PCM_16")
    wave_, rate, _ = load_audio(str(path))
    assert rate == 16000 and wave_.shape == (1600,)
    assert np.allclose(wave_.numpy(), (left + right) / 2, atol=1e-4)
    for subtype, width in (("PCM_16", 2), ("PCM_24", 3), ("PCM_U8", 1)):
        sf.write(tmp_path / "x.wav", np.stack([left, right], 1), 16000, subtype=subtype)
        stdlib, stdlib_rate = _read_wav_stdlib(str(tmp_path / "x.wav"), "x.wav")
        with wave.open(str(tmp_path / "x.wav")) as w:
            assert w.getsampwidth() == width
        reference, _ = read_audio_file(str(tmp_path / "x.wav"))
        assert stdlib_rate == 16000 and torch.allclose(stdlib, reference, atol=1.0 / 2 ** (8 * width - 1))
    sf.write(tmp_path / "x.flac", left, 16000)
    flac, _ = read_audio_file(str(tmp_path / "x.flac"))
    assert flac.shape == (1, 1600) and np.allclose(flac[0].numpy(), left, atol=1e-4)


def test_tables_array_values_and_lists_of_paths(tones, tmp_path):
    files = sorted((tones / "train").glob("*/*.wav"))
    table = tmp_path / "clips.csv"
    rel = [os.path.relpath(f, tmp_path) for f in files[:3]]
    table.write_text("clip,kind\n" + "".join(f"{r},{f.parent.name}\n" for r, f in zip(rel, files, strict=False)))
    array_clip = {"array": _sine(300.0, 8000, 0.25).tolist(), "sampling_rate": 8000}
    buffer = io.BytesIO()
    sf.write(buffer, _sine(300.0, 22050, 0.25).numpy(), 22050, format="WAV")
    jsonl = tmp_path / "arrays.jsonl"
    jsonl.write_text(json.dumps({"clip": array_clip, "kind": "high"}) + "\n" + json.dumps({"clip": {"path": rel[0]}, "kind": "high"}) + "\n")
    cfg = build_config({"task": "audio_classification", "model": {"name": str(tones / "w2v")},
                        "data": {"train": str(table), "audio_column": "clip", "label_column": "kind"}})
    data = prepare_task_data(get_task(cfg.task), cfg.data, 0)
    assert [r["clip"] for r in data.train] == [str(f) for f in files[:3]]  # relative to the table's folder
    run = Prepared(cfg, data.labels)
    for record in [*run.task.read(str(jsonl), cfg.data), {"clip": {"bytes": buffer.getvalue()}, "kind": "high"}]:
        item = run.encode(record)
        assert item["audio"].shape == (4000,)  # 0.25 s at the model's 16 kHz, whatever the source rate
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(rel) + "\n")
    assert [r["clip"] for r in run.task.read(str(listing), cfg.data)] == [str(f) for f in files[:3]]


def test_padding_does_not_change_a_clips_prediction(tones):
    cfg = build_config(_config(tones, tones / "unused"))
    data = prepare_task_data(get_task(cfg.task), cfg.data, 0)
    run = Prepared(cfg, data.labels)
    run.model.eval()
    short = run.encode({"audio": (_sine(400.0, 16000, 0.15).numpy(), 16000)})
    long = run.encode({"audio": (_sine(2000.0, 16000, 0.3).numpy(), 16000)})
    batch = run.collate([short, long])
    assert batch["input_values"].shape == (2, 4800)
    assert batch["attention_mask"].sum(1).tolist() == [2400, 4800]
    assert torch.all(batch["input_values"][0, 2400:] == 0)
    assert run.task.length(short) == 2400
    with torch.no_grad():
        together = run.task.logits(run.model, batch)
        alone = run.task.logits(run.model, run.collate([short]))
    torch.testing.assert_close(together[0], alone[0], atol=1e-4, rtol=1e-4)


# -- training ----------------------------------------------------------------------------------
def test_lora_on_wav2vec2_learns_the_tones(tones, tmp_path, capsys, monkeypatch):
    summary = run_training(build_config(_config(tones, tmp_path / "run")), quiet=True)
    before, after = summary["metric_before"], summary["metric_after"]
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"] + 0.2
    assert after["eval_loss"] < before["eval_loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and sorted(saved["modules_to_save"]) == ["classifier", "projector"]
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys and "base_model.model.projector.weight" in keys
    assert any(k.endswith("attention.out_proj.lora_A.weight") for k in keys)

    # Hugging Face PEFT reads the adapter (LoRA + the new head) and gives the same outputs
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForAudioClassification

    from peftkit import PeftModel

    def fresh():
        return AutoModelForAudioClassification.from_pretrained(str(tones / "w2v"), num_labels=2, ignore_mismatched_sizes=True)

    clip = torch.randn(2, 4000)
    with torch.no_grad():
        ours = PeftModel.from_pretrained(fresh(), str(tmp_path / "run" / "adapter")).eval()(input_values=clip).logits
        theirs = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "run" / "adapter")).eval()(input_values=clip).logits
    torch.testing.assert_close(ours, theirs)

    # `peftkit eval` and `peftkit predict` (paths from --input and from standard input)
    from peftkit.cli import main as cli_main

    assert cli_main(["eval", str(tmp_path / "run"), "--data", str(tones / "validation")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(after["accuracy"])
    clips = sorted((tones / "validation").glob("*/*.wav"))
    listing = tmp_path / "clips.txt"
    listing.write_text("\n".join(str(c) for c in clips) + "\n")
    assert cli_main(["predict", str(tmp_path / "run"), "--input", str(listing)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    pairs = [line.split("\t") for line in lines]
    assert [p for _, p in pairs] == [str(c) for c in clips]
    right = sum(label == Path(path).parent.name for label, path in pairs)
    assert right / len(pairs) >= 0.9
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{clips[0]}\n"))
    assert cli_main(["predict", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == "\t".join(pairs[0])


@pytest.mark.parametrize("method", [{"name": "ia3"}, {"name": "bottleneck", "bottleneck_size": 8}, {"name": "lora", "r": 4}])
def test_default_targets_of_other_methods_train_on_wav2vec2(tones, tmp_path, method):
    summary = run_training(build_config(_config(tones, tmp_path / "run", method=method, max_steps=8, eval_every=8)), quiet=True)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    targets = json.dumps(saved["target_modules"])
    expected = {"ia3": ("k_proj", "feed_forward.output_dense"), "bottleneck": ("out_proj", "output_dense"), "lora": ("q_proj", "v_proj")}
    assert all(name in targets for name in expected[method["name"]])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    history = [h["loss"] for h in rows if "loss" in h]
    assert history[-1] < history[0]
    assert summary["metric_after"]["eval_loss"] < summary["metric_before"]["eval_loss"]


def _tiny_whisper(path: Path) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForAudioClassification

    torch.manual_seed(0)
    config = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
                           max_target_positions=16, vocab_size=64, classifier_proj_size=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForAudioClassification(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(path)  # 1 s windows: 100 frames
    return path


def test_whisper_encoder_classification_trains_saves_and_loads(tones, tmp_path):
    from peftkit import PeftModel

    raw = _config(tones, tmp_path / "run", method={"name": "lora", "r": 4}, max_steps=4, eval_every=4)
    raw["model"]["name"] = str(_tiny_whisper(tmp_path / "whisper"))
    cfg = build_config(raw)
    summary = run_training(cfg, quiet=True)
    assert summary["steps"] == 4
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert sorted(saved["modules_to_save"]) == ["classifier", "projector"]

    # gradients reach the adapters and the head only; the saved adapter reproduces the outputs
    data = prepare_task_data(get_task(cfg.task), cfg.data, 0)
    run = Prepared(cfg, data.labels)
    batch = run.collate(run.encode_all(data.validation[:4]))
    assert set(batch) == {"input_features", "labels"} and batch["input_features"].shape == (4, 80, 100)
    from peftkit import get_peft_model
    from peftkit.train.config import method_config

    model = get_peft_model(run.model, run.with_heads(method_config(cfg)))
    run.task.loss(model, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n or ".projector." in n or ".classifier." in n for n in with_grad)
    assert any("lora_B" in n for n in with_grad)  # (lora_A gets a gradient once B is not zero)
    trained = PeftModel.from_pretrained(Prepared(cfg, data.labels).model, str(tmp_path / "run" / "adapter"))
    again = PeftModel.from_pretrained(Prepared(cfg, data.labels).model, str(tmp_path / "run" / "adapter"))
    trained.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(run.task.logits(trained, batch), run.task.logits(again, batch))
        base = Prepared(cfg, data.labels).model.eval()
        assert not torch.allclose(run.task.logits(trained, batch), run.task.logits(base, batch))


# -- errors ------------------------------------------------------------------------------------
def test_missing_audio_column_and_unreadable_files_are_named(tones, tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"file": "a.wav", "label": "x"}) + "\n")
    raw = {"task": "audio_classification", "model": {"name": str(tones / "w2v")}, "data": {"train": str(table)}}
    with pytest.raises(ConfigError, match=r"no column 'audio' \(data.audio_column\).*\['file', 'label'\]"):
        prepare_task_data(get_task("audio_classification"), build_config(raw).data, 0)
    table.write_text(json.dumps({"audio": "missing.wav", "label": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"record 1 names audio file .*missing.wav.*does not exist"):
        prepare_task_data(get_task("audio_classification"), build_config(raw).data, 0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    table.write_text(json.dumps({"audio": "broken.wav", "label": "x"}) + "\n")
    cfg = build_config(raw)
    data = prepare_task_data(get_task(cfg.task), cfg.data, 0)
    run = Prepared(cfg, data.labels)
    with pytest.raises(ConfigError, match=r"cannot read audio .*broken.wav"):
        run.encode(data.train[0])
    with pytest.raises(ConfigError, match="cannot read audio 'x.wav' as WAV"):
        _read_wav_stdlib(io.BytesIO(b"RIFF junk"), "x.wav")
    with pytest.raises(ConfigError, match="needs an integer sampling_rate"):
        load_audio({"array": [0.0, 0.1]})
    with pytest.raises(ConfigError, match="max_audio_seconds must be positive"):
        Prepared(build_config({**raw, "data": {"train": str(table), "max_audio_seconds": 0}}), ["x"])


def test_max_audio_seconds_cuts_long_clips(tones):
    cfg = build_config({**_config(tones, tones / "unused"), "data": {"train": str(tones / "train"), "max_audio_seconds": 0.1}})
    run = Prepared(cfg, ["high", "low"])
    assert run.encode({"audio": (_sine(300.0, 22050, 1.0).numpy(), 22050), "label": "low"})["audio"].shape == (1600,)


def test_a_bfloat16_model_takes_its_features_in_bfloat16(tones):
    cfg = build_config({**_config(tones, tones / "unused"), "model": {"name": str(tones / "w2v"), "dtype": "bfloat16"}})
    run = Prepared(cfg, ["high", "low"])
    batch = run.collate([run.encode({"audio": (_sine(300.0, 16000, 0.2).numpy(), 16000), "label": "low"})])
    assert batch["input_values"].dtype == torch.float32 and run.model.dtype == torch.bfloat16
    with torch.no_grad():
        loss = run.task.loss(run.model, batch)
    assert torch.isfinite(loss)


def test_example_config_runs_on_the_example_data(tmp_path):
    shutil.copy(EXAMPLES / "audio_tones.yaml", tmp_path / "audio_tones.yaml")
    make_tones.write_tones(str(tmp_path / "data" / "tones" / "train"), per_class=4, seed=0)
    make_tones.write_tones(str(tmp_path / "data" / "tones" / "validation"), per_class=2, seed=1)
    make_tones.write_tiny_wav2vec2(str(tmp_path / "data" / "tones" / "tiny-wav2vec2"))
    cfg = load_config(str(tmp_path / "audio_tones.yaml"), ["train.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    assert cfg.model.name == str(tmp_path / "data" / "tones" / "tiny-wav2vec2")  # resolved next to the config
    summary = run_training(cfg, quiet=True)
    assert summary["steps"] == 2 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["task"] == "audio_classification"
