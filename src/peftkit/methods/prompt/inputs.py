"""Pure helpers that extend a model's inputs by ``n`` virtual positions, and turn a prefix
table into a pre-filled attention cache.

Virtual positions always come first: masks get ``n`` ones in front, labels ``n`` ignored
entries (-100), token types ``n`` zeros; position ids give the virtual positions
``0..n-1`` and shift the real ones by ``n``, so a padded example sees exactly what it would
see alone.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "cache_length",
    "prefilled_cache",
    "prefix_layers",
    "prepend_ignored_labels",
    "prepend_ones",
    "prepend_positions",
    "prepend_zeros",
    "shift_positions",
]

IGNORE_INDEX = -100


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be (batch, length) to be extended for the virtual tokens, got shape {tuple(t.shape)}; "
            "pass a 2-D mask and let the model build the 4-D one"
        )


def prepend_ones(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``[1]*n + mask`` per row: the virtual positions are always attended to."""
    _check_2d("attention mask", mask)
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def prepend_zeros(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``[0]*n + ids`` per row (token type ids)."""
    _check_2d("token_type_ids", ids)
    return torch.cat([ids.new_zeros(ids.shape[0], n), ids], dim=1)


def prepend_ignored_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``[-100]*n + labels`` per row: virtual positions never count in the loss."""
    _check_2d("labels", labels)
    return torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], dim=1)


def prepend_positions(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """``[0..n-1] + (position_ids + n)`` per row."""
    _check_2d("position_ids", position_ids)
    virtual = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype).expand(position_ids.shape[0], n)
    return torch.cat([virtual, position_ids + n], dim=1)


def shift_positions(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """``position_ids + n``: positions of real tokens that follow ``n`` cached virtual ones."""
    return position_ids + n


def cache_length(cache: Any) -> int:
    """Positions already held by ``past_key_values`` (0 for None or an empty cache)."""
    if cache is None:
        return 0
    get_len = getattr(cache, "get_seq_length", None)
    if callable(get_len):
        return int(get_len())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def prefix_layers(
    table: torch.Tensor, num_layers: int, num_heads: int, cache_layers: int, encoder_decoder: bool, batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)`` prefixes, each ``(batch, heads, n, head_dim)``.

    Each row of ``table`` (``n × 2·num_layers·token_dim``) holds, for one virtual position,
    ``num_layers × 2`` blocks ``[k₀, v₀, k₁, v₁, ...]`` of ``token_dim = heads × head_dim``.
    Layer ``i`` of a decoder-only or encoder-only model gets blocks ``2i, 2i+1``. For
    encoder–decoder models the file layout (PEFT's) reads the blocks, repeated twice, in
    groups of four per decoder layer (self-attention key, value, then cross-attention key,
    value, unused): decoder layer ``j`` gets blocks ``4j mod 2L`` and ``4j+1 mod 2L``.

    Args:
        table: the prefix table.
        num_layers: ``L``, the number of layers the table was made for.
        num_heads: key/value heads.
        cache_layers: layers of the attention stack that receives the prefixes.
        encoder_decoder: use the encoder–decoder layout.
        batch: batch size to expand to.
    """
    n, width = table.shape
    blocks_per_row = 2 * num_layers
    if width % (blocks_per_row * num_heads):
        raise ValueError(
            f"prefix table width {width} is not 2 × num_layers ({num_layers}) × heads ({num_heads}) × head size"
        )
    head_dim = width // (blocks_per_row * num_heads)
    blocks = table.view(n, blocks_per_row, num_heads, head_dim).permute(1, 2, 0, 3)  # (2L, heads, n, head_dim)

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()

    out = []
    for layer in range(cache_layers):
        k_idx, v_idx = ((4 * layer) % blocks_per_row, (4 * layer + 1) % blocks_per_row) if encoder_decoder else (
            2 * layer,
            2 * layer + 1,
        )
        if v_idx >= blocks_per_row:
            raise ValueError(f"the prefix table holds {num_layers} layers but the model has more ({cache_layers})")
        out.append((expand(blocks[k_idx]), expand(blocks[v_idx])))
    return out


def _dynamic_cache(model_config: Any) -> Any:
    from transformers import DynamicCache

    if model_config is not None:
        try:
            return DynamicCache(config=model_config)
        except TypeError:  # older transformers: no config argument
            pass
    return DynamicCache()


def prefilled_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], model_config: Any, encoder_decoder: bool) -> Any:
    """A transformers cache holding ``layers`` as the first positions of every layer:
    ``DynamicCache``, or for encoder–decoder models an ``EncoderDecoderCache`` whose
    self-attention part holds them and whose cross-attention part is empty."""
    try:
        from transformers import EncoderDecoderCache
    except ImportError as exc:  # pragma: no cover - transformers is required for prefix tuning
        raise ImportError("prefix tuning hands prefixes to the model as a transformers cache: pip install transformers") from exc
    cache = _dynamic_cache(model_config)
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    if encoder_decoder:
        return EncoderDecoderCache(cache, _dynamic_cache(model_config))
    return cache
