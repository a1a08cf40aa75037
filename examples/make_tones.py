"""Writes the audio example's data and model (examples/data/tones/), so that
``peftkit train examples/audio_tones.yaml`` runs offline.

- ``train/`` and ``validation/``: one sub-folder per class of WAV clips, ``low`` (sine tones
  of 200–500 Hz) and ``high`` (1.5–3 kHz), 0.25 s each, with a random phase, a random
  loudness and background noise. Most clips are 16 kHz; every fifth is written at 22.05 kHz
  or 8 kHz, which peftkit resamples to the model's 16 kHz.
- ``tiny-wav2vec2/``: a small wav2vec 2.0 encoder (2 layers, hidden size 32) built from a
  config with random weights, saved with its feature extractor. It stands in for a
  pretrained checkpoint; point ``model.name`` at e.g. a local copy of
  ``facebook/wav2vec2-base`` or ``openai/whisper-tiny`` for real work.

Usage: ``python examples/make_tones.py [--out examples/data/tones] [--per-class 40]``
"""

from __future__ import annotations

import argparse
import math
import os
import random
import struct
import wave

CLASSES = {"low": (200.0, 500.0), "high": (1500.0, 3000.0)}


def tone(freq: float, rate: int, seconds: float, rng: random.Random) -> list[float]:
    """A sine of ``freq`` Hz with a random phase and loudness, plus white noise."""
    amplitude, phase = rng.uniform(0.3, 0.8), rng.uniform(0, 2 * math.pi)
    noise = rng.uniform(0.02, 0.1)
    return [amplitude * math.sin(2 * math.pi * freq * i / rate + phase) + rng.gauss(0, noise)
            for i in range(int(seconds * rate))]


def write_wav(path: str, samples: list[float], rate: int) -> None:
    """16-bit PCM mono WAV, written under a temporary name and renamed."""
    tmp = path + ".tmp"
    with wave.open(tmp, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(b"".join(struct.pack("<h", max(-32768, min(32767, round(s * 32767)))) for s in samples))
    os.replace(tmp, path)


def write_tones(root: str, per_class: int, seed: int = 0, seconds: float = 0.25,
                other_rates: tuple[int, ...] = (22050, 8000)) -> list[str]:
    """``per_class`` clips per class under ``root/<class>/``; returns the paths written."""
    rng = random.Random(seed)
    paths = []
    for label, (lo, hi) in CLASSES.items():
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(per_class):
            rate = other_rates[(i // 5) % len(other_rates)] if other_rates and i % 5 == 4 else 16000
            path = os.path.join(root, label, f"{label}_{i:03d}_{rate}hz.wav")
            write_wav(path, tone(rng.uniform(lo, hi), rate, seconds, rng), rate)
            paths.append(path)
    return paths


def write_tiny_wav2vec2(path: str, seed: int = 0) -> str:
    """A config-built 2-layer wav2vec 2.0 (hidden size 32) and its feature extractor."""
    import torch
    import transformers
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=32,
        feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0,
    )
    Wav2Vec2ForSequenceClassification(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "data", "tones"))
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = write_tones(os.path.join(args.out, "train"), args.per_class, args.seed)
    val = write_tones(os.path.join(args.out, "validation"), max(4, args.per_class // 4), args.seed + 1)
    model = write_tiny_wav2vec2(os.path.join(args.out, "tiny-wav2vec2"), args.seed)
    print(f"{len(train)} training and {len(val)} validation clips, model {model}")


if __name__ == "__main__":
    main()
