"""Writes the digits transfer example's data and pre-trained network (offline).

scikit-learn ships 1,797 handwritten digits as 8×8 grey-scale images. This script writes
them as PNG image folders (one sub-folder per class) in two groups, digits 0–4 and 5–9,
each split 80/20 into train and validation, and pre-trains ``cnn.SmallCNN`` on digits 0–4
(the "pretrained model"). ``transfer.yaml`` then adapts it to digits 5–9.

    python examples/digits/make_digits.py [--out examples/data/digits] [--epochs 30]
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cnn import SmallCNN  # noqa: E402


def write_folders(out: str, seed: int = 0) -> dict[str, int]:
    """PNG folders ``{pretrain,transfer}/{train,val}/<digit>/<n>.png``; returns counts."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    counts: dict[str, int] = {}
    seen: dict[int, int] = {}
    for i in order:
        label = int(digits.target[i])
        group = "pretrain" if label < 5 else "transfer"
        n = seen.get(label, 0)
        seen[label] = n + 1
        split = "val" if n % 5 == 4 else "train"
        folder = os.path.join(out, group, split, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = (digits.images[i] * 255.0 / 16.0).round().clip(0, 255).astype("uint8")
        path = os.path.join(folder, f"{i:04d}.png")
        Image.fromarray(pixels).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        key = f"{group}/{split}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _load_folder(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images normalised as the run's preprocessing does: [0, 1], then (x - 0.5) / 0.5."""
    import numpy as np
    from PIL import Image

    xs, ys = [], []
    classes = sorted(os.listdir(root), key=int)
    for index, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(root, name))):
            with Image.open(os.path.join(root, name, file)) as img:
                data = torch.from_numpy(np.asarray(img, dtype=np.float32)).view(1, 8, 8) / 255.0
            xs.append((data - 0.5) / 0.5)
            ys.append(index)
    return torch.stack(xs), torch.tensor(ys)


def pretrain(out: str, epochs: int = 30, seed: int = 0) -> float:
    """Trains SmallCNN on digits 0–4; writes ``cnn_0-4.safetensors``; returns validation accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y = _load_folder(os.path.join(out, "pretrain", "train"))
    vx, vy = _load_folder(os.path.join(out, "pretrain", "val"))
    model = SmallCNN(num_labels=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((model(vx).argmax(-1) == vy).float().mean())
    path = os.path.join(out, "cnn_0-4.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "..", "data", "digits"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    counts = write_folders(args.out)
    print("images:", counts)
    accuracy = pretrain(args.out, args.epochs)
    print(f"pre-trained on digits 0-4: validation accuracy {accuracy:.3f}; weights in {args.out}/cnn_0-4.safetensors")


if __name__ == "__main__":
    main()
