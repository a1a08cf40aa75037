"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): small down/up projections with a
non-linearity, added after or beside chosen layers."""

from __future__ import annotations

import re

from torch import nn

from peftkit.core.registry import Method, register_method
from peftkit.core.targeting import TargetError
from peftkit.integrations.transformers import is_linear_like
from peftkit.methods.bottleneck.config import BottleneckConfig
from peftkit.methods.bottleneck.layer import SUPPORTED, BottleneckLayer, create_bottleneck_layer

__all__ = ["BottleneckConfig", "BottleneckLayer"]

# (attention output projection, feed-forward output projection) per naming convention, as
# regular expressions over full module names.
_CONVENTIONS = (
    (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),  # BERT, RoBERTa, ViT
    (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),  # GPT-2
    (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),  # Llama, Mistral, Qwen
    (r".*\.(SelfAttention|EncDecAttention)\.o", r".*\.DenseReluDense\.wo"),  # T5
    (r".*\.(attention|self_attn)\.(o_proj|out_proj)", r".*\.fc2"),  # ViT, CLIP, Whisper, OPT
    (r".*\.attention\.out_proj", r".*\.feed_forward\.output_dense"),  # wav2vec 2.0, HuBERT, WavLM
)


def _prepare_config(model: nn.Module, config: BottleneckConfig) -> None:
    """Writes the variant's default targets into the config (so the saved file names them)."""
    if config.target_modules is not None:
        return
    names = [n for n, m in model.named_modules() if is_linear_like(m) or isinstance(m, BottleneckLayer)]
    for attention, feed_forward in _CONVENTIONS:
        if any(re.fullmatch(feed_forward, n) for n in names):
            config.target_modules = feed_forward if config.variant == "pfeiffer" else f"({attention})|({feed_forward})"
            return
    raise TargetError(
        f"no default bottleneck targets for {type(model).__name__}: name the attention-output and feed-forward "
        "output layers in target_modules (e.g. ['o_proj', 'down_proj'])"
    )


METHOD = register_method(
    Method(
        peft_type="BOTTLENECK",
        config_cls=BottleneckConfig,
        description="Bottleneck adapters (Houlsby / Pfeiffer / parallel): down-project, non-linearity, up-project; not mergeable",
        supported=SUPPORTED,
        is_supported=is_linear_like,
        create_layer=create_bottleneck_layer,
        prepare_config=_prepare_config,
        presets={"adapter": {"method": {"name": "bottleneck"}, "train": {"lr": 1e-3}}},
    )
)
