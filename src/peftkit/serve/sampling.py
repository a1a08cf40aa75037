"""Sampling parameters of one request and the choice of the next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What a request asks of decoding. ``temperature == 0`` is greedy (argmax)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: decode past end-of-sequence tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A generator per choice: choice ``i`` of a seeded request draws from ``seed + i``."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed + index)
    return g


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits: argmax, or a draw at ``temperature`` from the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
