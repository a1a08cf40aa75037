"""The rows of the invariant table (``tests/test_invariants.py``): one :class:`Case` per
method × model × variant, with what the table must know of each method to check it —
which trainable parameters are the method's own, how many there must be (computed from
the layer shapes, never read back from the library), whether it merges, whether it trains
the model's weights in place, and whether its unmerge copies stored values back.

Tests may look at parameter names (the library may not): that is how a row says which
parameters belong to its method.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from adapter_checks import base_name
from models import build
from peftkit import (
    AdaLoraConfig,
    BitFitConfig,
    BottleneckConfig,
    FullFineTuningConfig,
    IA3Config,
    LayerwiseConfig,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SparseConfig,
    VeraConfig,
)
from peftkit.core.layer import adapter_layers
from peftkit.methods.layernorm import is_norm
from peftkit.methods.layerwise import find_blocks

__all__ = [
    "CASES",
    "LORA_LAYER_TYPES",
    "LORA_REFUSED",
    "LORA_ROWS",
    "LORA_VARIANTS",
    "TRAITS",
    "Case",
    "Traits",
    "ia3_count",
    "top_block_count",
]

# Tiny models (tests/models.py): hidden 32, 2 blocks, feed-forward 37 (GPT-2: 4·32 = 128),
# Llama with one key/value head of 16.
HIDDEN = 32
BLOCKS = 2


def _matches(name: str, entries: tuple[str, ...]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _numel(model: nn.Module, keep: Callable[[str], bool]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))


@dataclass(frozen=True)
class Traits:
    """What the table knows of a method as a whole.

    Attributes:
        owns: whether a trainable parameter of the wrapped model (by its name) is the
            method's: ``owns(name, case, config)``.
        mergeable: the method folds into the weights (else merging must be refused).
        in_place: the method trains the model's own weights where they are.
        exact_unmerge: unmerging copies stored values back (no arithmetic), so it restores
            the weights to the bit; otherwise unmerge computes them back, within rounding.
    """

    owns: Callable[[str, Case, PeftConfig], bool]
    mergeable: bool = True
    in_place: bool = False
    exact_unmerge: bool = False


@dataclass(frozen=True)
class Case:
    """One row of the table: a method on a model, in one variant.

    Attributes:
        method: the method's ``peft_type`` (a key of ``peftkit.list_methods()``).
        variant: the variant's name ("" for the method's defaults).
        kind: the model (tests/models.py).
        config: makes the config.
        count: the number of trainable parameters, from the plain model and the config
            the model stores after wrapping: ``count(plain, config)``.
        lr: the learning rate of the few training steps.
        keep_original: an in-place method keeps a copy of the original weights.
        saved: the number of values in the adapter file, where it is not ``count``.
        frozen_added: parameters the method adds that never train (sparse indices).
        check_targets: checks which layers were wrapped: ``check_targets(inner, plain, config)``.
        row: names the row where the model alone does not (LoRA: the layer type).
        perturb_scale: the size of the noise that moves the adapter from its start.
        merge_refused: the method merges, but not on this row's layers (the check expects
            the refusal).
    """

    method: str
    variant: str
    kind: str
    config: Callable[[], PeftConfig]
    count: Callable[[nn.Module, PeftConfig], int]
    lr: float = 1e-2
    keep_original: bool = False
    saved: Callable[[nn.Module, PeftConfig], int] | None = None
    frozen_added: Callable[[nn.Module, PeftConfig], int] | None = None
    check_targets: Callable[[nn.Module, nn.Module, PeftConfig], None] | None = None
    row: str = ""
    perturb_scale: float = 0.1
    merge_refused: bool = False

    @property
    def name(self) -> str:
        return "-".join(part for part in (self.method, self.row or self.kind, self.variant) if part)

    @property
    def traits(self) -> Traits:
        return TRAITS[self.method]

    @property
    def tags(self) -> tuple[str, ...]:
        """What ``NOT_APPLICABLE`` may name: the method, the method with a variant, or the
        method on a row (``LORA@conv2d_grouped``)."""
        tags = (self.method, f"{self.method}/{self.variant}") if self.variant else (self.method,)
        return (*tags, f"{self.method}@{self.row}") if self.row else tags


# -- LoRA: every variant on every layer type (the layer × variant table) ---------------------
@dataclass(frozen=True)
class Row:
    """A layer type (or model) that LoRA adapts."""

    kind: str
    targets: tuple[str, ...]
    layer_type: str  # class name of the wrapped modules
    head: str  # a module for the modules_to_save variant
    parameters: tuple[str, ...] = ()  # target_parameters (then targets is empty)
    kind_of_layer: str = ""  # the layer type's name in LORA_LAYER_TYPES / LORA_REFUSED, where not layer_type

    @property
    def label(self) -> str:
        return self.kind_of_layer or self.layer_type


LORA_ROWS = {
    # one small module per layer type: every variant
    "linear": Row("mlp", ("lin0", "lin1"), "Linear", "head"),
    "gpt2_conv1d": Row("gpt2", ("c_attn", "c_proj"), "Conv1D", "ln_f"),
    "conv1d": Row("cnn", ("conv1d",), "Conv1d", "head"),
    "conv2d": Row("cnn", ("conv1", "conv2"), "Conv2d", "head"),
    "embedding": Row("mlp", ("emb",), "Embedding", "head"),
    # the transformers models of tests/models.py
    "bert": Row("bert", ("query", "value"), "Linear", "classifier"),
    "llama": Row("llama", ("q_proj", "v_proj"), "Linear", "lm_head"),
    "llama_embedding": Row("llama", ("embed_tokens",), "Embedding", "lm_head"),
    "t5": Row("t5", ("q", "v"), "Linear", "lm_head"),
    "vit": Row("vit", ("q_proj", "v_proj"), "Linear", "classifier"),
    # the layer types of tests/models.py's Zoo
    "conv2d_grouped": Row("zoo", ("dwconv", "gconv"), "Conv2d", "head", kind_of_layer="Conv2d(groups>1)"),
    "multihead_attention": Row("zoo", ("attn",), "MultiheadAttention", "head"),
    "parameter": Row("zoo", (), "Experts", "head", parameters=(
        "experts.gate_up_proj", "experts.down_proj", "experts_t.gate_up_proj", "experts_t.down_proj"),
        kind_of_layer="nn.Parameter"),
}
LORA_LAYER_TYPES = {"Linear", "Conv1D", "Conv1d", "Conv2d", "Embedding", "Conv2d(groups>1)", "MultiheadAttention",
                    "nn.Parameter"}


@dataclass(frozen=True)
class Variant:
    options: tuple[tuple[str, Any], ...] = ()
    modules_to_save: bool = False


LORA_VARIANTS = {
    "plain": Variant(),
    "rslora": Variant((("use_rslora", True), ("lora_alpha", 16))),
    "dora": Variant((("use_dora", True),)),
    "gaussian": Variant((("init_lora_weights", "gaussian"),)),
    "pissa": Variant((("init_lora_weights", "pissa"),)),
    "bias_all": Variant((("bias", "all"),)),
    "bias_lora_only": Variant((("bias", "lora_only"),)),
    "modules_to_save": Variant(modules_to_save=True),
}

# (layer type, variant) -> why there is no such row: the library refuses the combination
_PISSA = "PiSSA initialises linear layers only (refused)"
LORA_REFUSED: dict[tuple[str, str], str] = {
    ("Conv2d(groups>1)", "dora"): "a grouped convolution's update is not grouped: no per-output norm (refused)",
    ("Conv2d(groups>1)", "pissa"): _PISSA,
    ("MultiheadAttention", "dora"): "DoRA on nn.MultiheadAttention is refused, as in PEFT",
    ("MultiheadAttention", "pissa"): _PISSA,
    ("nn.Parameter", "dora"): "DoRA on target_parameters is refused, as in PEFT",
    ("nn.Parameter", "pissa"): _PISSA,
    ("Conv1d", "pissa"): "PiSSA initialises linear layers only (refused on convolutions)",
    ("Conv2d", "pissa"): "PiSSA initialises linear layers only (refused on convolutions)",
    ("Embedding", "pissa"): "PiSSA initialises linear layers only (refused on embeddings)",
}


def _lora_config(row: Row, variant: Variant) -> LoraConfig:
    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": list(row.targets)}
    if row.parameters:
        kwargs["target_parameters"] = list(row.parameters)
    kwargs.update(dict(variant.options))
    if variant.modules_to_save:
        kwargs["modules_to_save"] = [row.head]
    return LoraConfig(**kwargs)


def _full_name(plain: nn.Module, entry: str) -> str:
    return next(n for n, _ in plain.named_modules() if _matches(n, (entry,)))


def _lora_count(plain: nn.Module, config: PeftConfig) -> int:
    """r·(in + out) per wrapped weight (+ out for DoRA's magnitudes), r·(vocab + dim) per
    embedding, plus the trained biases and the copy of a module to save."""
    assert isinstance(config, LoraConfig)
    targets = tuple(config.target_modules)
    r, total = config.r, 0
    for name, param in plain.named_parameters():  # target_parameters: r·(d₁ + d₂) per expert
        if _matches(name, tuple(config.target_parameters or ())):
            total += r * param.shape[0] * (param.shape[1] + param.shape[2])
    for name, module in plain.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(module, nn.MultiheadAttention):  # in_proj (E → 3E) and out_proj (E → E)
            e = module.embed_dim
            total += r * (e + 3 * e) + r * (e + e)
            total += 4 * e if config.bias == "lora_only" else 0
            continue
        w = module.weight
        if isinstance(module, nn.Embedding):
            total += r * (w.shape[0] + w.shape[1]) + (w.shape[1] if config.use_dora else 0)
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1:  # A dense (r, in, k, k), B grouped (out, r/groups)
            total += r * module.in_channels * w[0, 0].numel() + w.shape[0] * r // module.groups
            total += module.bias.numel() if config.bias == "lora_only" else 0
            continue
        if type(module).__name__ == "Conv1D":
            fan_in, out = w.shape[0], w.shape[1]
        else:
            fan_in, out = w[0].numel(), w.shape[0]
        total += r * (fan_in + out) + (out if config.use_dora else 0)
        if config.bias == "lora_only" and getattr(module, "bias", None) is not None:
            total += module.bias.numel()
    if config.bias == "all":
        total += _numel(plain, lambda n: n.endswith("bias"))
    for entry in config.modules_to_save or []:
        total += sum(p.numel() for p in plain.get_submodule(_full_name(plain, entry)).parameters())
    return total


_LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
               "out_proj_lora_A", "out_proj_lora_B"}


def _lora_owns(name: str, case: Case, config: PeftConfig) -> bool:
    assert isinstance(config, LoraConfig)
    parts = name.split(".")
    if _LORA_PARTS & set(parts) and "default" in parts:
        return True
    if ".modules_to_save.default." in name:
        return True
    if name.endswith("bias") and config.bias == "all":
        return True
    # bias="lora_only": the biases of the wrapped layers, and only those
    if name.endswith(("base_layer.in_proj_bias", "base_layer.out_proj.bias")) and config.bias == "lora_only":
        return True  # the biases of the projections LoRA adapts in an nn.MultiheadAttention
    return (name.endswith("base_layer.bias") and config.bias == "lora_only"
            and _matches(base_name(name).rsplit(".", 1)[0], tuple(config.target_modules)))


def _lora_targets_checker(row: Row) -> Callable[[nn.Module, nn.Module, PeftConfig], None]:
    if row.parameters:
        return _parameter_targets_checker(row)

    def check(inner: nn.Module, plain: nn.Module, config: PeftConfig) -> None:
        wrapped = {n: type(layer.base_layer).__name__ for n, layer in adapter_layers(inner) if not n.endswith(row.head)}
        expected = [n for n, _ in plain.named_modules() if _matches(n, row.targets)]
        assert sorted(wrapped) == sorted(expected)
        assert set(wrapped.values()) == {row.layer_type}

    return check


def _parameter_targets_checker(row: Row) -> Callable[[nn.Module, nn.Module, PeftConfig], None]:
    """One layer per parameter, nested in the module's registration order (the first
    innermost), around the module holding them."""

    def check(inner: nn.Module, plain: nn.Module, config: PeftConfig) -> None:
        owners = sorted({p.rsplit(".", 1)[0] for p in row.parameters})
        for owner in owners:
            own = [p.rsplit(".", 1)[1] for p in row.parameters if p.startswith(owner + ".")]
            order = [n for n in plain.get_submodule(owner)._parameters if n in own]
            layer = inner.get_submodule(owner)
            for expected in reversed(order):  # outermost: the last registered
                assert getattr(layer, "parameter_name", None) == expected, (owner, expected)
                layer = layer.base_layer
            assert type(layer).__name__ == row.layer_type
        assert sorted(n for n, _ in adapter_layers(inner) if not n.endswith(row.head) and ".base_layer" not in n) == owners

    return check


# An embedding's B starts random (A at zero), so noise on A moves ΔE = s·(B·A)ᵀ far more than
# noise on a linear layer's factors moves its ΔW. DoRA's unmerge rounds relative to W₀ + ΔW
# (it divides the merged table by m/‖W₀+ΔW‖, then subtracts ΔW), which the table compares to
# the larger of W₀ and the merged weight: smaller noise keeps ΔE of the size of W₀.
EMBEDDING_DORA_PERTURB = 0.02


def _lora_cases() -> list[Case]:
    cases = []
    for row_name, row in LORA_ROWS.items():
        for variant_name, variant in LORA_VARIANTS.items():
            if (row.label, variant_name) in LORA_REFUSED:
                continue
            cases.append(Case(
                "LORA", variant_name, row.kind,
                config=lambda row=row, variant=variant: _lora_config(row, variant),
                count=_lora_count, check_targets=_lora_targets_checker(row), row=row_name,
                merge_refused=row.label == "Conv2d(groups>1)",
                perturb_scale=EMBEDDING_DORA_PERTURB if (row.layer_type, variant_name) == ("Embedding", "dora") else 0.1,
            ))
    return cases


# -- (IA)³, BitFit, LayerNorm tuning, layer-wise and full fine-tuning ------------------------
def ia3_count(kind: str) -> int:
    """Σ out over key/value targets + Σ in over feed-forward targets."""
    per_block = {
        "bert": 32 + 32 + 37,  # key, value (out 32), layer.N.output.dense (in 37)
        "vit": 32 + 32 + 37,
        "gpt2": 96 + 128,  # c_attn (out 3·32), mlp.c_proj (in 4·32)
        "llama": 16 + 16 + 37,  # k_proj, v_proj (out 16), down_proj (in 37)
    }
    if kind == "t5":  # encoder: k, v, wo; decoder: self k, v + cross k, v, wo
        return 2 * (32 + 32 + 37) + 2 * (4 * 32 + 37)
    if kind == "mlp":  # lin0 output (32) and lin1 input (32)
        return 32 + 32
    if kind == "cnn":  # conv1 output (8), conv2 input (8), conv1d output (8)
        return 8 + 8 + 8
    return BLOCKS * per_block[kind]


def _bitfit_count(plain: nn.Module, config: PeftConfig) -> int:
    """Every bias of the model."""
    return _numel(plain, lambda n: n.endswith("bias"))


def _ln_count(plain: nn.Module, config: PeftConfig) -> int:
    """Weights and biases of every norm."""
    return sum(p.numel() for m in plain.modules() if is_norm(m) for p in m.parameters(recurse=False))


def top_block_count(kind: str) -> int:
    """The parameters of the top block (layer-wise with ``top_layers=1``)."""
    plain = build(kind)
    block = find_blocks(plain).blocks[-1]
    return _numel(plain, lambda n: n.startswith(block + "."))


def _in_container(*containers: str) -> Callable[[str, Case, PeftConfig], bool]:
    def owns(name: str, case: Case, config: PeftConfig) -> bool:
        return any(f".{c}." in name + "." for c in containers)

    return owns


def _own_weight(name: str, case: Case, config: PeftConfig) -> bool:
    """In place: a parameter of the plain model itself, no other."""
    return name.removeprefix("base_model.model.") in _plain_names(case.kind)


_PLAIN_NAMES: dict[str, set[str]] = {}


def _plain_names(kind: str) -> set[str]:
    if kind not in _PLAIN_NAMES:
        _PLAIN_NAMES[kind] = {n for n, _ in build(kind).named_parameters()}
    return _PLAIN_NAMES[kind]


WRAPPER_LR, IN_PLACE_LR = 0.05, 2e-3  # whole blocks need smaller steps than vectors


IA3_PERTURB = 0.5  # the vectors start at 1; a change of 0.1 barely shows through BERT's LayerNorms


def _methods_a_cases() -> list[Case]:
    return [
        *(Case("IA3", "", k, lambda: IA3Config(init_ia3_weights=True), lambda p, c, k=k: ia3_count(k), WRAPPER_LR,
               perturb_scale=IA3_PERTURB) for k in ("bert", "gpt2", "llama", "t5", "vit")),
        Case("IA3", "", "mlp", lambda: IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
             lambda p, c: ia3_count("mlp"), WRAPPER_LR, perturb_scale=IA3_PERTURB),
        Case("IA3", "", "cnn", lambda: IA3Config(target_modules=["conv1", "conv2", "conv1d"], feedforward_modules=["conv2"]),
             lambda p, c: ia3_count("cnn"), WRAPPER_LR, perturb_scale=IA3_PERTURB),
        *(Case("BITFIT", "", k, BitFitConfig, _bitfit_count, WRAPPER_LR) for k in ("bert", "gpt2", "vit", "mlp", "cnn")),
        *(Case("LN_TUNING", "", k, LNTuningConfig, _ln_count, WRAPPER_LR) for k in ("bert", "gpt2", "llama", "t5", "vit")),
        *(Case("LAYERWISE", "", k, lambda: LayerwiseConfig(top_layers=1), lambda p, c, k=k: top_block_count(k), IN_PLACE_LR)
          for k in ("bert", "gpt2", "llama", "t5")),
        *(Case("LAYERWISE", "keep", k, lambda: LayerwiseConfig(top_layers=1, keep_original=True),
               lambda p, c, k=k: top_block_count(k), IN_PLACE_LR, keep_original=True) for k in ("gpt2", "llama", "vit")),
        *(Case("FULL", "", k, FullFineTuningConfig, lambda p, c: _numel(p, lambda n: True), IN_PLACE_LR)
          for k in ("bert", "gpt2", "mlp")),
        *(Case("FULL", "keep", k, lambda: FullFineTuningConfig(keep_original=True), lambda p, c: _numel(p, lambda n: True),
               IN_PLACE_LR, keep_original=True) for k in ("llama", "t5", "cnn")),
    ]


# -- bottleneck adapters ---------------------------------------------------------------------
BOTTLENECK_SIZE = 4
# family -> (attention-output layers, feed-forward output layers), as regular expressions
# over module names: Houlsby and parallel adapt both, Pfeiffer the feed-forward ones only.
BOTTLENECK_TARGETS = {
    "bert": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "vit": (r".*\.attention\.o_proj", r".*\.mlp\.fc2"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
    "llama": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "t5": (r".*\.(SelfAttention|EncDecAttention)\.o", r".*\.DenseReluDense\.wo"),
}
BOTTLENECK_LAYERS = {  # how many layers each variant adapts: a check of the patterns above
    ("bert", "pfeiffer"): 2, ("vit", "pfeiffer"): 2, ("gpt2", "pfeiffer"): 2, ("llama", "pfeiffer"): 2,
    ("t5", "pfeiffer"): 4,  # encoder and decoder blocks
    ("bert", "houlsby"): 4, ("vit", "houlsby"): 4, ("gpt2", "houlsby"): 4, ("llama", "houlsby"): 4,
    ("t5", "houlsby"): 10,  # encoder: self-attention, FF; decoder: self-, cross-attention, FF
}


def _dims(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def _bottleneck_layers(plain: nn.Module, kind: str, variant: str) -> list[nn.Module]:
    attention, feed_forward = BOTTLENECK_TARGETS[kind]
    patterns = [feed_forward] if variant == "pfeiffer" else [attention, feed_forward]
    found = [m for n, m in plain.named_modules() if any(re.fullmatch(p, n) for p in patterns)]
    assert len(found) == BOTTLENECK_LAYERS[kind, "houlsby" if variant == "parallel" else variant]
    return found


def _bottleneck_count(kind: str, variant: str) -> Callable[[nn.Module, PeftConfig], int]:
    """Per adapted layer: D (source → m, with bias) and U (m → out, with bias); the source
    is the layer's output (sequential) or its input (parallel)."""

    def count(plain: nn.Module, config: PeftConfig) -> int:
        total, m = 0, BOTTLENECK_SIZE
        for module in _bottleneck_layers(plain, kind, variant):
            d_in, d_out = _dims(module)
            source = d_in if variant == "parallel" else d_out
            total += source * m + m + m * d_out + d_out
        return total

    return count


def _bottleneck_cases() -> list[Case]:
    return [
        Case("BOTTLENECK", variant, kind,
             lambda variant=variant: BottleneckConfig(variant=variant, bottleneck_size=BOTTLENECK_SIZE),
             _bottleneck_count(kind, variant))
        for kind in ("bert", "gpt2", "llama", "t5", "vit")
        for variant in ("houlsby", "pfeiffer", "parallel")
    ]


# -- sparse fine-tuning ----------------------------------------------------------------------
SPARSE_COUNT = 200


def _sparse_cases() -> list[Case]:
    return [
        Case("SPARSE", selection, kind, lambda selection=selection: SparseConfig(count=SPARSE_COUNT, selection=selection),
             lambda p, c: SPARSE_COUNT, lr=5e-2,
             saved=lambda p, c: 2 * SPARSE_COUNT,  # the values and their (int64) indices
             frozen_added=lambda p, c: SPARSE_COUNT)  # the indices: parameters that never train
        for kind in ("mlp", "bert", "gpt2", "llama")
        for selection in ("magnitude", "random")
    ]


# -- soft prompts ----------------------------------------------------------------------------
VIRTUAL_TOKENS = 4
ENCODER_HIDDEN = 16
PROMPT_TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
KV_WIDTH = {"llama": 16}  # one key/value head of 16; the others: the hidden size
CLASSIFIER = HIDDEN * 2 + 2  # BERT's head, trained beside the prompt (SEQ_CLS)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _prompt_rows(kind: str, method: str) -> int:
    """Virtual tokens, for each of T5's encoder and decoder (prefix tuning: once)."""
    return VIRTUAL_TOKENS * (2 if kind == "t5" and method != "PREFIX_TUNING" else 1)


def _prefix_width(kind: str) -> int:
    """A key and a value for every layer, per virtual position."""
    return 2 * BLOCKS * KV_WIDTH.get(kind, HIDDEN)


def _prompt_count(kind: str, method: str, variant: str) -> Callable[[nn.Module, PeftConfig], int]:
    """The table E (rows × width), the re-parametrisation network if any, and BERT's head."""

    def count(plain: nn.Module, config: PeftConfig) -> int:
        rows, h = _prompt_rows(kind, method), ENCODER_HIDDEN
        head = CLASSIFIER if kind == "bert" else 0
        if method == "PROMPT_TUNING":
            return rows * HIDDEN + head
        if method == "PREFIX_TUNING":  # the table is as wide as a key (or value) of one layer
            kv, width = KV_WIDTH.get(kind, HIDDEN), _prefix_width(kind)
            if variant == "plain":
                return rows * width + head
            return rows * kv + _linear(kv, h) + _linear(h, width) + head  # P = W₂·tanh(W₁·E + b₁) + b₂
        if variant == "lstm":  # bidirectional LSTM of 2 layers (input 32, then 2·16), then an MLP 2·16 → 2·16 → 32
            lstm = sum(2 * (4 * h * (n_in + h) + 2 * 4 * h) for n_in in (HIDDEN, 2 * h))
            return rows * HIDDEN + lstm + _linear(2 * h, 2 * h) + _linear(2 * h, HIDDEN) + head
        return rows * HIDDEN + _linear(HIDDEN, h) + _linear(h, h) + _linear(h, HIDDEN) + head  # MLP of 2 hidden layers

    return count


def _prompt_saved(kind: str, method: str) -> Callable[[nn.Module, PeftConfig], int]:
    """The file holds the table P the network produces (folded), and BERT's head."""

    def saved(plain: nn.Module, config: PeftConfig) -> int:
        width = _prefix_width(kind) if method == "PREFIX_TUNING" else HIDDEN
        return _prompt_rows(kind, method) * width + (CLASSIFIER if kind == "bert" else 0)

    return saved


def _prompt_config(kind: str, method: str, variant: str) -> Callable[[], PeftConfig]:
    common = {"task_type": PROMPT_TASKS[kind], "num_virtual_tokens": VIRTUAL_TOKENS}
    if method == "PROMPT_TUNING":
        return lambda: PromptTuningConfig(**common)
    if method == "PREFIX_TUNING":
        if variant == "plain":
            return lambda: PrefixTuningConfig(**common)
        return lambda: PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN)
    return lambda: PromptEncoderConfig(**common, encoder_hidden_size=ENCODER_HIDDEN,
                                       encoder_reparameterization_type=variant.upper())


def _prompt_cases() -> list[Case]:
    variants = {  # method -> {variant: models}
        "PROMPT_TUNING": {"": tuple(PROMPT_TASKS)},
        "PREFIX_TUNING": {"projection": tuple(PROMPT_TASKS), "plain": ("gpt2", "llama")},
        "P_TUNING": {"mlp": tuple(PROMPT_TASKS), "lstm": ("gpt2", "t5")},
    }
    return [
        Case(method, variant, kind, _prompt_config(kind, method, variant), _prompt_count(kind, method, variant),
             lr=WRAPPER_LR, saved=_prompt_saved(kind, method))
        for method, by_variant in variants.items()
        for variant, kinds in by_variant.items()
        for kind in kinds
    ]


# -- LoHa, LoKr, VeRA, OFT, AdaLoRA ----------------------------------------------------------
# Counts from the tiny models' shapes: mlp lin0 32 × 16, lin1 32 × 32; cnn conv1 8 × 3 × 3 × 3,
# conv2 8 × 8 × 3 × 3; BERT query/value 32 × 32 in each of 2 blocks; Llama q_proj 32 × 32.
TUNER_R = 2


def _loha_count(kind: str) -> int:
    """Two rank-r products per layer: 2·r·(out + in), with in = in_channels·k·k on a
    convolution; with Tucker cores (cnn row): 2·(r·out + r·in + r·r·k·k)."""
    r = TUNER_R
    if kind == "mlp":
        return 2 * r * (32 + 16) + 2 * r * (32 + 32)
    return 2 * (r * 8 + r * 3 + r * r * 9) + 2 * (r * 8 + r * 8 + r * r * 9)


def _lokr_count(kind: str) -> int:
    """W1 ⊗ W2 with out = a·b, in = c·d split near the square roots (32 = 4·8, 16 = 4·4,
    8 = 2·4, 3 = 1·3). mlp, r = 2: W1 (4 × 4) full; W2 factored as (b × r)(r × d) since
    r < max(b, d)/2: lin0 16 + 8·2 + 2·4, lin1 16 + 8·2 + 2·8. cnn: r ≥ max(b, d)/2, so W2
    is a full kernel: conv1 W1 (2 × 1) + W2 (4 × 3 × 3 × 3), conv2 W1 (2 × 2) + W2 (4 × 4 × 3 × 3)."""
    if kind == "mlp":
        return (16 + 16 + 8) + (16 + 16 + 16)
    return (2 + 4 * 3 * 9) + (4 + 4 * 4 * 9)


VERA_R = 8
VERA_LAYERS = {"mlp": ((32, 16), (32, 32)), "bert": ((32, 32),) * 4}  # (out, in) of each target


def _vera_count(kind: str) -> int:
    """λ_b (out) and λ_d (r) per layer."""
    return sum(out + VERA_R for out, _ in VERA_LAYERS[kind])


def _vera_saved(kind: str) -> int:
    """The vectors, and the shared A (r × largest in) and B (largest out × r)."""
    shapes = VERA_LAYERS[kind]
    return _vera_count(kind) + VERA_R * max(i for _, i in shapes) + max(o for o, _ in shapes) * VERA_R


OFT_BLOCK = 4


def _oft_count(kind: str) -> int:
    """(in / b) blocks of b(b-1)/2 values per layer (b = 4: 6 values)."""
    inputs = {"mlp": (16, 32), "llama": (32,) * 2}[kind]  # llama: q_proj of 2 blocks
    return sum(i // OFT_BLOCK * OFT_BLOCK * (OFT_BLOCK - 1) // 2 for i in inputs)


ADALORA_R = 4


def _adalora_count(kind: str) -> int:
    """init_r triplets per layer: Q (r × in), λ (r), P (out × r)."""
    shapes = {"mlp": ((32, 16), (32, 32)), "bert": ((32, 32),) * 4}[kind]
    return sum(ADALORA_R * (i + o + 1) for o, i in shapes)


_TUNER_TARGETS = {"mlp": ["lin0", "lin1"], "cnn": ["conv1", "conv2"], "bert": ["query", "value"], "llama": ["q_proj"]}
VERA_PERTURB = 1.0  # λ_b starts at 0 and λ_d at 0.1: a change of 0.1 barely shows


def _tuner_cases() -> list[Case]:
    t = _TUNER_TARGETS
    return [
        Case("LOHA", "", "mlp", lambda: LoHaConfig(r=TUNER_R, alpha=4, target_modules=t["mlp"]),
             lambda p, c: _loha_count("mlp")),
        Case("LOHA", "tucker", "cnn", lambda: LoHaConfig(r=TUNER_R, target_modules=t["cnn"], use_effective_conv2d=True),
             lambda p, c: _loha_count("cnn")),
        Case("LOKR", "", "mlp", lambda: LoKrConfig(r=TUNER_R, alpha=4, target_modules=t["mlp"]),
             lambda p, c: _lokr_count("mlp")),
        Case("LOKR", "", "cnn", lambda: LoKrConfig(r=TUNER_R, target_modules=t["cnn"]), lambda p, c: _lokr_count("cnn")),
        *(Case("VERA", "", k, lambda k=k: VeraConfig(r=VERA_R, target_modules=t[k]), lambda p, c, k=k: _vera_count(k),
               WRAPPER_LR, saved=lambda p, c, k=k: _vera_saved(k), perturb_scale=VERA_PERTURB) for k in ("mlp", "bert")),
        *(Case("OFT", "", k, lambda k=k: OFTConfig(r=0, oft_block_size=OFT_BLOCK, target_modules=t[k]),
               lambda p, c, k=k: _oft_count(k)) for k in ("mlp", "llama")),
        *(Case("ADALORA", "", k, lambda k=k: AdaLoraConfig(init_r=ADALORA_R, target_r=2, total_step=10, target_modules=t[k]),
               lambda p, c, k=k: _adalora_count(k), perturb_scale=0.5) for k in ("mlp", "bert")),
    ]


def _prompt_owns(name: str, case: Case, config: PeftConfig) -> bool:
    return name.startswith("model_adapters.default.") or ".modules_to_save.default." in name


TRAITS: dict[str, Traits] = {
    "LORA": Traits(_lora_owns),
    "IA3": Traits(_in_container("ia3_l")),
    "BITFIT": Traits(_in_container("bitfit"), exact_unmerge=True),
    "LN_TUNING": Traits(_in_container("ln_tuning_layers"), exact_unmerge=True),
    "LAYERWISE": Traits(_own_weight, in_place=True, exact_unmerge=True),
    "FULL": Traits(_own_weight, in_place=True, exact_unmerge=True),
    "BOTTLENECK": Traits(_in_container("adapter_down", "adapter_up"), mergeable=False),
    "SPARSE": Traits(_in_container("sparse_values"), exact_unmerge=True),
    "PROMPT_TUNING": Traits(_prompt_owns, mergeable=False),
    "PREFIX_TUNING": Traits(_prompt_owns, mergeable=False),
    "P_TUNING": Traits(_prompt_owns, mergeable=False),
    "LOHA": Traits(_in_container("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    "LOKR": Traits(_in_container("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
    "VERA": Traits(_in_container("vera_lambda_b", "vera_lambda_d")),
    "OFT": Traits(_in_container("oft_R")),
    "ADALORA": Traits(_in_container("lora_A", "lora_B", "lora_E")),
}

CASES: dict[str, Case] = {
    case.name: case
    for case in (*_lora_cases(), *_methods_a_cases(), *_bottleneck_cases(), *_sparse_cases(), *_prompt_cases(), *_tuner_cases())
}
