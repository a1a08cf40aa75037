"""Writes the CLIP demo offline: a tiny CLIPModel (2 layers, hidden size 32, random
weights) with its CLIPProcessor, and image-caption pairs of coloured shapes.

    python examples/make_clip_demo.py            # -> examples/data/clip_colors/
    peftkit train examples/clip_colors.yaml

The model folder ``examples/data/clip_colors/tiny-clip`` has the layout of any CLIP
checkpoint (config.json, model.safetensors, tokenizer and preprocessor files); point
``model.name`` at a real one (e.g. a downloaded ``openai/clip-vit-base-patch32``) for a real
run. Images are drawn here from a seed: no third-party data.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path
from typing import Any

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle", "stripe")
CAPTIONS = ("a {colour} {shape}.", "a {shape} in {colour}.", "a picture of a {colour} {shape}.", "{colour} {shape} on grey.")


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level BPE alphabet (each byte as a printable character, alone and as a
    word end ``</w>``) and its two special tokens: a complete vocabulary without merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    chars = [chr(codes[b]) for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_clip(out: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A config-built CLIPModel and its CLIPProcessor saved in ``out``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=byte_level_vocab(), merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 64, **special},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def draw(colour: str, shape: str, rng: random.Random, size: int = 40) -> Any:
    """A ``size``-pixel image: a noisy grey background with one shape in ``colour``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randint(100, 150) for _ in range(3)))
    pen = ImageDraw.Draw(image)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    a, b = rng.randint(2, size // 4), rng.randint(3 * size // 4, size - 2)
    if shape == "square":
        pen.rectangle((a, a, b, b), fill=fill)
    elif shape == "circle":
        pen.ellipse((a, a, b, b), fill=fill)
    else:
        pen.rectangle((0, a, size, a + size // 3), fill=fill)
    for _ in range(size * 2):  # speckle noise
        x, y = rng.randrange(size), rng.randrange(size)
        image.putpixel((x, y), tuple(rng.randint(0, 255) for _ in range(3)))
    return image


def make_pairs(root: Path, n: int, split: str, seed: int) -> Path:
    """``root/<split>.csv`` with columns image (a path relative to the file), caption, label;
    images under ``root/images/<split>/``."""
    rng = random.Random(seed)
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], rng.choice(SHAPES)
        name = f"{i:04d}_{colour}_{shape}.png"
        draw(colour, shape, rng).save(folder / name)
        caption = rng.choice(CAPTIONS).format(colour=colour, shape=shape)
        rows.append({"image": f"images/{split}/{name}", "caption": caption, "label": colour})
    path = root / f"{split}.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "clip_colors"))
    parser.add_argument("--train", type=int, default=192)
    parser.add_argument("--validation", type=int, default=64)
    args = parser.parse_args()
    root = Path(args.out)
    build_tiny_clip(root / "tiny-clip")
    make_pairs(root, args.train, "train", seed=1)
    make_pairs(root, args.validation, "validation", seed=2)
    print(f"wrote {root}/tiny-clip, {root}/train.csv ({args.train} pairs), {root}/validation.csv ({args.validation} pairs)")


if __name__ == "__main__":
    main()
