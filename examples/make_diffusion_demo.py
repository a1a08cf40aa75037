"""Builds what examples/diffusion_lora.yaml trains on, offline: a tiny Stable Diffusion
pipeline with random weights (UNet, VAE, CLIP text encoder and tokenizer built from
configs) and synthetic image–caption pairs (coloured shapes on a plain background).

Run from the repository root:

    python examples/make_diffusion_demo.py            # writes runs/diffusion_demo/
    peftkit train examples/diffusion_lora.yaml

The pipeline is for trying the workflow in seconds; for real use, point ``model.name`` at
a Stable Diffusion 1.x/2.x pipeline folder and ``data`` at your images and captions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A CLIP byte-pair vocabulary of single letters (no merges): enough for the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_pipeline(folder: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Writes a StableDiffusionPipeline with a 2-level UNet (32/64 channels, 8×8 latents),
    a 2-level VAE (16×16 images), a 2-layer CLIP text encoder (hidden size 32) and a DDPM
    scheduler to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    vocab, merges = write_tokenizer_files(folder / "_tokenizer_source")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


def draw(colour: str, shape: str, rng: random.Random, size: int = 32):
    """A ``size``×``size`` RGB image: one coloured shape at a jittered place on grey."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    r = size // 4 + rng.randint(-2, 2)
    cx, cy = size // 2 + rng.randint(-3, 3), size // 2 + rng.randint(-3, 3)
    box = (cx - r, cy - r, cx + r, cy + r)
    (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
    return image


def make_pairs(folder: str | os.PathLike, n_train: int = 16, n_validation: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Writes PNG images and ``train.jsonl`` / ``validation.jsonl`` tables of
    ``{"image": relative path, "caption": "a red circle"}`` to ``folder``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    paths = []
    for split, count in (("train", n_train), ("validation", n_validation)):
        rows = []
        for i in range(count):
            colour, shape = kinds[i % len(kinds)]
            name = f"images/{split}_{i:03d}.png"
            draw(colour, shape, rng).save(folder / name)
            rows.append({"image": name, "caption": f"a {colour} {shape}"})
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/diffusion_demo", help="folder to write the pipeline and data into")
    args = parser.parse_args()
    build_tiny_pipeline(Path(args.out) / "pipeline")
    train, validation = make_pairs(Path(args.out) / "data")
    print(f"pipeline: {Path(args.out) / 'pipeline'}\ntrain: {train}\nvalidation: {validation}")


if __name__ == "__main__":
    main()
