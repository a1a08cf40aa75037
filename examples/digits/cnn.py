"""A small convolutional network for 8×8 grey-scale digits: three convolution stages
(an ``nn.ModuleList`` of one block class, so layer-wise fine-tuning finds them) and a
linear head."""

from __future__ import annotations

import torch
from torch import nn


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.conv(x)))


class SmallCNN(nn.Module):
    """1×8×8 -> 16×8×8 -> 32×4×4 -> 64×2×2 -> ``num_labels`` logits."""

    def __init__(self, num_labels: int = 5) -> None:
        super().__init__()
        self.stages = nn.ModuleList([Stage(1, 16, False), Stage(16, 32, True), Stage(32, 64, True)])
        self.head = nn.Linear(64 * 2 * 2, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
        return self.head(x.flatten(1))


def small_cnn(num_labels: int = 5) -> SmallCNN:
    """The factory ``model.name: cnn.py:small_cnn`` names in the example configs."""
    return SmallCNN(num_labels)
