"""Audio classification: transformers speech encoders (wav2vec 2.0, HuBERT, WavLM, the
Whisper encoder, AST, ... through ``AutoModelForAudioClassification``) with a new head for
the run's labels.

Data: a folder with one sub-folder of audio files per class, a table (CSV/JSONL/Parquet) of
audio file paths and labels, or a saved ``datasets`` dataset whose audio column holds
``{"array", "sampling_rate"}`` or ``{"path"/"bytes"}`` values. Files are read with
soundfile (WAV, FLAC, OGG, MP3; without soundfile, WAV through the standard library), mixed
down to mono and resampled to the feature extractor's sampling rate by band-limited
(windowed-sinc) interpolation.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.train.schema import ConfigError, DataSection, RunConfig
from peftkit.train.tasks.base import (
    Batch,
    CheckpointModel,
    ClassData,
    Item,
    Task,
    add_class_labels,
    class_encoder,
    class_labels,
    logits_of,
    require_column,
    to_device,
)

__all__ = ["AudioClassificationTask", "AudioProcessor", "load_audio", "read_audio_file", "read_audio_folder", "resample"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
LIST_EXTENSIONS = (".txt", ".lst")
# Heads that AutoModelForAudioClassification models build for the labels (wav2vec 2.0,
# HuBERT, WavLM and Whisper: projector + classifier; AST: classifier)
HEAD_NAMES = ("projector", "classifier")


# -- resampling ---------------------------------------------------------------------------
def _kaiser(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The Kaiser window on [-1, 1] (zero outside)."""
    inside = x.abs() <= 1
    arg = beta * torch.sqrt(torch.clamp(1 - x * x, min=0.0))
    return torch.where(inside, torch.special.i0(arg) / torch.special.i0(torch.tensor(beta, dtype=x.dtype)), torch.zeros_like(x))


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int, zero_crossings: int = 24, rolloff: float = 0.95,
             beta: float = 8.6) -> torch.Tensor:
    """Band-limited resampling of a mono signal by windowed-sinc interpolation.

    Output sample ``j`` lies at input time ``t = j·orig/new`` (in input samples) and is
    ``y[j] = Σₙ x[n]·h(t − n)`` with ``h(τ) = 2f·sinc(2f·τ)·w(τ / W)``: a low-pass filter at
    ``f = rolloff·min(1, new/orig) / 2`` cycles per input sample (just below the lower of the
    two Nyquist frequencies, so downsampling does not alias), ``W = zero_crossings / (2f)``
    input samples each side, and ``w`` a Kaiser window with parameter ``beta``. Positions
    are computed in exact integer arithmetic, so any pair of rates works (44100 → 16000,
    22050 → 16000, 8000 → 16000, ...). The signal is taken as zero outside its ends.

    Args:
        waveform: 1-D float tensor.
        orig_sr: its sampling rate (Hz).
        new_sr: the wanted sampling rate (Hz).

    Returns:
        A 1-D float32 tensor of ``ceil(len · new / orig)`` samples.
    """
    if waveform.dim() != 1:
        raise ValueError(f"resample takes a 1-D (mono) signal, got shape {tuple(waveform.shape)}")
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} and {new_sr}")
    if orig_sr == new_sr:
        return waveform.to(torch.float32)
    x = waveform.to(torch.float32)
    n_in = x.shape[0]
    n_out = -(-n_in * new_sr // orig_sr)
    cutoff = 0.5 * rolloff * min(1.0, new_sr / orig_sr)
    half = zero_crossings / (2 * cutoff)
    reach = int(math.floor(half))
    taps = torch.arange(-reach, reach + 2, dtype=torch.int64)  # input offsets from floor(t)
    # output j and j + phases lie at the same fraction t − floor(t) of an input step: one row
    # of filter weights per phase j mod phases
    phases = new_sr // math.gcd(orig_sr, new_sr)
    frac = (torch.arange(phases, dtype=torch.int64) * orig_sr % new_sr).to(torch.float64) / new_sr
    tau = frac[:, None] - taps[None, :].to(torch.float64)
    table = (2 * cutoff * torch.sinc(2 * cutoff * tau) * _kaiser(tau / half, beta)).to(torch.float32)
    padded = F.pad(x, (reach, reach + 2)).contiguous()
    out = torch.empty(n_out, dtype=torch.float32)
    down = orig_sr // math.gcd(orig_sr, new_sr)
    # outputs p, p + phases, p + 2·phases, ... share a phase, and their first input sample
    # moves by `down` each time: a strided view of the input times that phase's weights
    for p in range(min(phases, n_out)):
        count = -(-(n_out - p) // phases)
        first = p * orig_sr // new_sr
        windows = padded.as_strided((count, len(taps)), (down, 1), padded.storage_offset() + first)
        out[p::phases] = windows @ table[p]
    return out


# -- reading audio --------------------------------------------------------------------------
def _read_wav_stdlib(source: Any, name: str) -> tuple[torch.Tensor, int]:
    """PCM WAV (8/16/24/32-bit integer) through the standard library's ``wave`` module."""
    import wave

    import numpy as np

    try:
        with wave.open(source, "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ConfigError(f"cannot read audio {name!r} as WAV ({exc}); for FLAC, float WAV and other formats "
                          "`pip install soundfile`") from exc
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 2**15
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        data = (np.where(value >= 2**23, value - 2**24, value)).astype(np.float32) / 2**23
    elif width == 4:
        data = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2**31
    else:
        raise ConfigError(f"{name!r}: WAV with {8 * width}-bit samples is not supported; `pip install soundfile`")
    return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, channels).T)), rate


def read_audio_file(source: Any, name: str | None = None) -> tuple[torch.Tensor, int]:
    """``(channels × frames float32 tensor in [-1, 1], sampling rate)`` of an audio file (a
    path or a binary file object)."""
    name = name or str(source)
    try:
        import soundfile
    except ImportError:
        if isinstance(source, str) and not source.lower().endswith(".wav"):
            raise ConfigError(f"reading {name!r} needs soundfile (`pip install soundfile`); without it only WAV is read") from None
        return _read_wav_stdlib(source, name)
    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, OSError, TypeError) as exc:
        raise ConfigError(f"cannot read audio {name!r}: {exc}") from exc
    return torch.from_numpy(data.T.copy()), int(rate)


def _to_mono(data: Any, name: str) -> torch.Tensor:
    wave = torch.as_tensor(data, dtype=torch.float32)
    if wave.dim() == 2:
        # (channels, frames) from files; an array value may come either way round
        wave = wave.mean(0) if wave.shape[0] <= wave.shape[1] else wave.mean(1)
    if wave.dim() != 1:
        raise ConfigError(f"audio {name!r} has shape {tuple(wave.shape)}; expected samples or (channels, samples)")
    if wave.numel() == 0:
        raise ConfigError(f"audio {name!r} holds no samples")
    return wave


def load_audio(value: Any, base_dir: str = "") -> tuple[torch.Tensor, int, str]:
    """``(mono waveform, sampling rate, name)`` from a file path (relative to ``base_dir``),
    a ``datasets`` audio value (``{"array", "sampling_rate"}`` or ``{"path", "bytes"}``), or an
    ``(array, sampling_rate)`` pair."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], int):
        return _to_mono(value[0], "<array>"), value[1], "<array>"
    if isinstance(value, dict):
        if value.get("array") is not None:
            rate = value.get("sampling_rate")
            if not isinstance(rate, int) or rate <= 0:
                raise ConfigError(f"an audio value with an array needs an integer sampling_rate, got {rate!r}")
            name = value.get("path") or "<array>"
            return _to_mono(value["array"], name), rate, name
        if value.get("bytes"):
            name = value.get("path") or "<bytes>"
            data, rate = read_audio_file(io.BytesIO(value["bytes"]), name)
            return _to_mono(data, name), rate, name
        if value.get("path"):
            value = value["path"]
        else:
            raise ConfigError(f"an audio value needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {sorted(value)}")
    if isinstance(value, str):
        path = value if os.path.isabs(value) or not base_dir else os.path.join(base_dir, value)
        if not os.path.isfile(path):
            raise ConfigError(f"audio file {path!r} does not exist")
        data, rate = read_audio_file(path)
        return _to_mono(data, path), rate, path
    raise ConfigError(f"cannot read audio from a value of type {type(value).__name__}; give a file path or "
                      "a dict with 'array' and 'sampling_rate'")


def read_audio_folder(path: str, audio_column: str = "audio", label_column: str = "label") -> list[dict[str, Any]] | None:
    """Records ``{audio: file path, label: sub-folder name}`` of a folder with one sub-folder
    per class (or ``{audio: file path}`` for a folder of unlabelled files); None when ``path``
    is not laid out that way."""
    from peftkit.train.data import is_saved_dataset, read_class_folders

    records = read_class_folders(path, AUDIO_EXTENSIONS, audio_column, label_column)
    if not records and os.path.isdir(path) and not is_saved_dataset(path):
        entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
        records = [{audio_column: os.path.join(path, e)} for e in entries if e.lower().endswith(AUDIO_EXTENSIONS)]
    return records or None


def _read_saved_dataset(path: str, audio_column: str) -> list[dict[str, Any]]:
    """Rows of a saved ``datasets`` dataset; an ``Audio`` column is read undecoded (path and
    bytes), so that peftkit decodes and resamples it."""
    from peftkit.train.data import load_saved_dataset

    data = load_saved_dataset(path)
    feature = data.features.get(audio_column)
    if type(feature).__name__ == "Audio" and getattr(feature, "decode", False):
        data = data.cast_column(audio_column, type(feature)(decode=False))
    return [dict(row) for row in data]


# -- preprocessing ----------------------------------------------------------------------------
class AudioProcessor:
    """A transformers feature extractor with what a run needs around it: the model's sampling
    rate, a length cap, and batching (pad to the longest clip, with an attention mask where
    the feature extractor makes one and the model takes it)."""

    def __init__(self, feature_extractor: Any, use_attention_mask: bool, max_seconds: float | None = None) -> None:
        if max_seconds is not None and max_seconds <= 0:
            raise ConfigError(f"data.max_audio_seconds must be positive, got {max_seconds}")
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.input_name = feature_extractor.model_input_names[0]
        self.use_attention_mask = use_attention_mask
        self.max_samples = int(max_seconds * self.sampling_rate) if max_seconds else None

    def save_pretrained(self, path: str) -> None:
        self.feature_extractor.save_pretrained(path)

    def waveform(self, value: Any, base_dir: str = "") -> torch.Tensor:
        """The clip ``value`` names, mono, at the model's sampling rate, cut to the cap."""
        wave, rate, _ = load_audio(value, base_dir)
        if rate != self.sampling_rate:
            wave = resample(wave, rate, self.sampling_rate)
        if self.max_samples:
            wave = wave[: self.max_samples]
        return wave

    def features(self, waves: Sequence[torch.Tensor]) -> Batch:
        """The model inputs of a batch of waveforms: each clip goes through the feature
        extractor on its own (per-clip normalisation sees no padding), then all are padded."""
        fe = self.feature_extractor
        one = [{self.input_name: fe(w.numpy(), sampling_rate=self.sampling_rate)[self.input_name][0]} for w in waves]
        padded = fe.pad(one, padding=True, return_attention_mask=self.use_attention_mask, return_tensors="pt")
        batch = {self.input_name: padded[self.input_name].to(torch.float32)}
        if self.use_attention_mask and "attention_mask" in padded:
            batch["attention_mask"] = padded["attention_mask"].to(torch.long)
        return batch


def load_audio_model(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, AudioProcessor]:
    """An ``AutoModelForAudioClassification`` with a new head for ``labels`` and its feature
    extractor, from ``model.name`` (a local folder or a hub id)."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from peftkit.train.modeling import load_checkpoint, transformers_source

    path, dtype = transformers_source(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
                      label2id={str(v): i for i, v in enumerate(labels)}, ignore_mismatched_sizes=True)
    try:
        model = AutoModelForAudioClassification.from_pretrained(path, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"{path!r} is not an audio classification model (AutoModelForAudioClassification: {exc})") from exc
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
    try:
        extractor = AutoFeatureExtractor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path!r} has no feature extractor (preprocessor_config.json): {exc}") from exc
    from peftkit.train.tasks.image import takes_keyword

    use_mask = bool(getattr(extractor, "return_attention_mask", False)) and takes_keyword(model, "attention_mask")
    return model, AudioProcessor(extractor, use_mask, cfg.data.max_audio_seconds)


@dataclass
class AudioData(ClassData):
    """``max_audio_seconds``: clips longer than this are cut to their first seconds."""

    audio_column: str = "audio"
    max_audio_seconds: float | None = None


class AudioClassificationTask(Task):
    name = "audio_classification"
    model_options = CheckpointModel
    data_options = AudioData
    task_type = None  # Hugging Face PEFT's task types are for text models
    default_metric = "accuracy"
    unit = "clips"

    def read(self, path: str, data: DataSection) -> list[dict[str, Any]]:
        """A class-per-sub-folder tree, a single audio file, a list of paths (``.txt``, one a
        line), a table, or a saved ``datasets`` folder."""
        records = read_audio_folder(path, data.audio_column, data.label_column)
        if records is not None:
            return records
        lower = path.lower()
        if os.path.isfile(path) and lower.endswith(AUDIO_EXTENSIONS):
            return [{data.audio_column: path}]
        from peftkit.train.data import data_folder, read_records

        base = data_folder(path)
        if lower.endswith(LIST_EXTENSIONS):
            with open(path, encoding="utf-8") as fh:
                records = [{data.audio_column: line.strip()} for line in fh if line.strip()]
        elif os.path.isdir(path):
            records = _read_saved_dataset(path, data.audio_column)
        else:
            records = read_records(path, data.encoding)
        for r in records:  # relative paths are relative to the data file
            value = r.get(data.audio_column)
            if isinstance(value, str) and not os.path.isabs(value):
                r[data.audio_column] = os.path.normpath(os.path.join(base, value))
            elif isinstance(value, dict) and isinstance(value.get("path"), str) and not value.get("bytes") \
                    and value.get("array") is None and not os.path.isabs(value["path"]):
                r[data.audio_column] = {**value, "path": os.path.normpath(os.path.join(base, value["path"]))}
        return records

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        require_column(records, data.audio_column, path, "data.audio_column")
        require_column(records, data.label_column, path, "data.label_column")
        for number, r in enumerate(records, 1):
            value = r[data.audio_column]
            file = value.get("path") if isinstance(value, dict) and not value.get("bytes") and value.get("array") is None else value
            if isinstance(file, str) and not os.path.isfile(file):
                raise ConfigError(f"{path}: record {number} names audio file {file!r}, which does not exist")

    def labels(self, train: list[dict[str, Any]], validation: list[dict[str, Any]], data: DataSection) -> list[Any]:
        return class_labels(train, validation, data)

    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        return load_audio_model(cfg, labels)

    def head_modules(self, model: Any, processor: Any) -> list[str]:
        return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)]

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        column = cfg.data.audio_column

        def waveform(record: dict[str, Any]) -> torch.Tensor:
            if column not in record:
                raise ConfigError(f"a record has no audio column {column!r} (data.audio_column); its keys are {sorted(record)}")
            return processor.waveform(record[column])

        return class_encoder("audio", waveform, cfg.data.label_column, labels)

    def collator(self, cfg: RunConfig, processor: Any) -> Callable[[Sequence[Item]], Batch]:
        def collate(items: Sequence[Item]) -> Batch:
            return add_class_labels(processor.features([i["audio"] for i in items]), items)

        return collate

    def length(self, item: Item) -> int:
        return int(item["audio"].shape[0])

    def logits(self, model: Any, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        dtype = getattr(model, "dtype", None)  # a bfloat16/float16 model takes its features in that type
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        return logits_of(model(**inputs))

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float(), batch["labels"])

    def class_probabilities(self, model: Any, batch: Batch) -> torch.Tensor:
        return torch.softmax(self.logits(model, batch).float(), dim=-1)

    def eval_batch(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        logits = self.logits(model, batch)
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return loss.double(), len(batch["labels"]), logits.argmax(-1), batch["labels"]

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        value = record.get(cfg.data.audio_column)
        if isinstance(value, dict):
            value = value.get("path")
        return value if isinstance(value, str) else "<audio>"

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        column = cfg.data.audio_column
        device = next(model.parameters()).device
        for start in range(0, len(records), 16):
            chunk = records[start : start + 16]
            missing = next((r for r in chunk if column not in r), None)
            if missing is not None:
                raise ConfigError(f"a record has no audio column {column!r} (data.audio_column); its keys are {sorted(missing)}")
            waves = [processor.waveform(r[column]) for r in chunk]
            batch = to_device(processor.features(waves), device)
            with torch.no_grad():
                pred = self.logits(model, batch).argmax(-1).tolist()
            for record, p in zip(chunk, pred, strict=True):
                yield f"{labels[p] if labels else p}\t{self.describe(record, cfg)}"

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        """``peftkit predict`` reading audio file paths from standard input."""
        return [{cfg.data.audio_column: line.strip()} for line in lines]
