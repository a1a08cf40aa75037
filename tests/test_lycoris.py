"""LyCORIS LoHa / LoKr files (kohya module names) load into peftkit's LoHa and LoKr on a Stable
Diffusion UNet and text encoder: the outputs are those of the weights with the file's ΔW
added by the LyCORIS formulas (written out here, independently of the library), and the
result saves as a Hugging Face PEFT adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file

from adapter_checks import assert_rounding_close, rounding_tolerance
from peftkit import LoHaConfig, LoKrConfig, get_peft_model
from peftkit.core.layer import AdapterLayer
from peftkit.integrations.lycoris import LycorisError, kohya_name, load_lycoris, save_lycoris

pytest.importorskip("diffusers")

# Two computations of the same function (ΔW added to the weights, against ΔW·x beside W₀x)
# through a UNet of a dozen layers of width ≤ 256: a few roundings of those sums each.
REL = rounding_tolerance(256, ulps=40)


_BUILT: dict[str, torch.nn.Module] = {}


def _unet():
    """A fresh copy of the tiny UNet (built once: building is the slow part)."""
    if "unet" not in _BUILT:
        _BUILT["unet"] = _build_unet()
    return copy.deepcopy(_BUILT["unet"])


def _build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(  # the tiny UNet of examples/make_diffusion_demo.py
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=16, projection_dim=32)).eval()


@torch.no_grad()
def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=g)).sample


@torch.no_grad()
def _text_out(encoder) -> torch.Tensor:
    return encoder(torch.randint(2, 60, (2, 9), generator=torch.Generator().manual_seed(1)))[0]


def _rand(*shape: int, seed: list[int]) -> torch.Tensor:
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.3


# -- the LyCORIS formulas, written out --------------------------------------------------------
def _loha_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    scale = float(t["alpha"]) / t["hada_w1_b"].shape[0]
    if "hada_t1" in t:  # Tucker: K[p, q, k, l] = Σ t[i, j, k, l]·a[i, p]·b[j, q]
        k1 = torch.einsum("ijkl,ip,jq->pqkl", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        k2 = torch.einsum("ijkl,ip,jq->pqkl", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        return k1 * k2 * scale
    return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale).reshape(shape)


def _lokr_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = 1.0 if rank is None else float(t["alpha"]) / rank  # both factors full: no alpha scaling
    return torch.kron(w1, w2).reshape(shape) * scale


def _merged(model, prefix: str, file: dict[str, torch.Tensor], delta) -> torch.nn.Module:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in file.items():
        module, _, suffix = key.rpartition(".")
        grouped.setdefault(module, {})[suffix] = value
    names = {kohya_name(prefix, n): n for n, _ in model.named_modules() if n}
    # kohya names CLIP's modules under text_model, a level transformers 5 no longer has
    names |= {kohya_name(prefix, "text_model." + n): n for n, _ in model.named_modules() if n}
    with torch.no_grad():
        for key, tensors in grouped.items():
            weight = model.get_submodule(names[key]).weight
            weight.add_(delta(tensors, weight.shape))
    return model


def _loha_file() -> dict[str, torch.Tensor]:
    """LoHa on the attention projections (linear), a 1 × 1 and a 3 × 3 convolution (Tucker)."""
    s, r, out = [0], 2, {}
    for name, (o, i) in {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
                         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 32),
                         "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": (256, 32),
                         "down_blocks.0.attentions.0.proj_in": (32, 32)}.items():
        key = kohya_name("lora_unet", name)
        out |= {f"{key}.hada_w1_a": _rand(o, r, seed=s), f"{key}.hada_w1_b": _rand(r, i, seed=s),
                f"{key}.hada_w2_a": _rand(o, r, seed=s), f"{key}.hada_w2_b": _rand(r, i, seed=s),
                f"{key}.alpha": torch.tensor(1.0, dtype=torch.float16)}
    key = kohya_name("lora_unet", "down_blocks.0.resnets.0.conv1")  # 32 × 32 × 3 × 3
    out |= {f"{key}.hada_t1": _rand(r, r, 3, 3, seed=s), f"{key}.hada_t2": _rand(r, r, 3, 3, seed=s),
            f"{key}.hada_w1_a": _rand(r, 32, seed=s), f"{key}.hada_w1_b": _rand(r, 32, seed=s),
            f"{key}.hada_w2_a": _rand(r, 32, seed=s), f"{key}.hada_w2_b": _rand(r, 32, seed=s),
            f"{key}.alpha": torch.tensor(4.0)}
    return out


def _lokr_file() -> dict[str, torch.Tensor]:
    """LoKr on the text encoder: 32 = 4·8, so W1 is 4 × 4 and W2 (8 × 8) a rank-2 product; fc1
    (64 × 32 = (8·8) × (4·8)) with both factors full (no alpha scaling)."""
    s, out = [0], {}
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            key = kohya_name("lora_te", f"text_model.encoder.layers.{layer}.self_attn.{proj}")
            out |= {f"{key}.lokr_w1": _rand(4, 4, seed=s), f"{key}.lokr_w2_a": _rand(8, 2, seed=s),
                    f"{key}.lokr_w2_b": _rand(2, 8, seed=s), f"{key}.alpha": torch.tensor(3.0)}
    key = kohya_name("lora_te", "text_model.encoder.layers.1.mlp.fc1")
    out |= {f"{key}.lokr_w1": _rand(8, 4, seed=s), f"{key}.lokr_w2": _rand(8, 8, seed=s), f"{key}.alpha": torch.tensor(1.0)}
    return out


def test_lycoris_loha_file_loads_into_a_unet(tmp_path) -> None:
    file = _loha_file()
    save_file(file, tmp_path / "loha.safetensors")
    expected = _unet_out(_merged(_unet(), "lora_unet", {k: v.float() for k, v in file.items()}, _loha_delta))
    base = _unet_out(_unet())
    model = load_lycoris(_unet(), tmp_path / "loha.safetensors", prefix="lora_unet")
    got = _unet_out(model)
    assert (expected - base).abs().max() > 100 * REL * base.abs().max()  # the file changes the output
    assert_rounding_close(got, expected, REL)
    config = model.peft_config["default"]
    assert config.peft_type == "LOHA" and config.use_effective_conv2d and len(config.target_modules) == 5
    # an ordinary peftkit adapter: it saves in PEFT's format, and PEFT reads it
    peft = pytest.importorskip("peft")
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_unet(), tmp_path / "adapter")
    assert_rounding_close(_unet_out(theirs), got, REL)


def test_lycoris_lokr_file_loads_into_a_text_encoder(tmp_path) -> None:
    file = _lokr_file()
    expected = _text_out(_merged(_text_encoder(), "lora_te", file, _lokr_delta))
    base = _text_out(_text_encoder())
    model = load_lycoris(_text_encoder(), file, prefix="lora_te")
    assert (expected - base).abs().max() > 100 * REL * base.abs().max()
    assert_rounding_close(_text_out(model), expected, REL)
    assert model.peft_config["default"].peft_type == "LOKR"
    merged = model.merge_and_unload()
    assert_rounding_close(_text_out(merged), expected, REL)


def test_lycoris_files_that_do_not_fit_are_refused_before_any_change() -> None:
    file = _lokr_file()
    wrong = {k.replace("layers_1_mlp_fc1", "layers_7_mlp_fc1"): v for k, v in file.items()}
    encoder = _text_encoder()
    with pytest.raises(LycorisError, match="layers_7_mlp_fc1: the model has no such module.*closest"):
        load_lycoris(encoder, wrong, prefix="lora_te")
    with pytest.raises(LycorisError, match="no lora_unet_"):
        load_lycoris(encoder, file, prefix="lora_unet")
    kohya_lora = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32)}
    with pytest.raises(LycorisError, match="neither LoHa's nor LoKr's"):
        load_lycoris(encoder, kohya_lora, prefix="lora_te")
    mixed = file | {k.replace("lora_unet", "lora_te").replace("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                                                             "text_model_encoder_layers_0_self_attn_k_proj"): v
                    for k, v in _loha_file().items() if "attn1_to_q" in k}
    with pytest.raises(LycorisError, match="mixes LoHa and LoKr"):
        load_lycoris(encoder, mixed, prefix="lora_te")
    bad_shape = dict(file)
    key = kohya_name("lora_te", "text_model.encoder.layers.0.self_attn.q_proj")
    bad_shape[f"{key}.lokr_w2_b"] = torch.zeros(2, 9)
    with pytest.raises(LycorisError, match=r"lokr_w2_b: the file holds shape \(2, 9\)"):
        load_lycoris(encoder, bad_shape, prefix="lora_te")
    assert not any(isinstance(m, AdapterLayer) for m in encoder.modules()), "a refused file changed the model"


def test_peftkit_loha_and_lokr_write_lycoris_files_that_read_back(tmp_path) -> None:
    """save_lycoris then load_lycoris: the same outputs; kohya names (CLIP under text_model)."""
    unet = get_peft_model(_unet(), LoHaConfig(r=2, alpha=3, target_modules=["to_q", "to_v", "conv1"],
                                              use_effective_conv2d=True, init_weights=False))
    expected = _unet_out(unet)
    save_lycoris(unet, tmp_path / "unet.safetensors", prefix="lora_unet")
    assert_rounding_close(_unet_out(load_lycoris(_unet(), tmp_path / "unet.safetensors")), expected, REL)
    # lokr on the text encoder: q_proj factored (W2 a rank-2 product), fc1 with both factors full
    encoder = get_peft_model(_text_encoder(), LoKrConfig(r=2, alpha=5, target_modules=["q_proj", "fc1"],
                                                         rank_pattern={"fc1": 8}, init_weights=False))
    expected = _text_out(encoder)
    save_lycoris(encoder, tmp_path / "te.safetensors", prefix="lora_te")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "te.safetensors")
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lokr_w2" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2_b" in keys
    assert_rounding_close(_text_out(load_lycoris(_text_encoder(), tmp_path / "te.safetensors", prefix="lora_te")),
                          expected, REL)
    with pytest.raises(LycorisError, match="no LoHa or LoKr adapter named 'other'"):
        save_lycoris(encoder, tmp_path / "x.safetensors", prefix="lora_te", adapter_name="other")


def test_a_lycoris_file_converts_to_lora_with_the_same_outputs(tmp_path) -> None:
    """LyCORIS LoHa → peftkit LoHa → LoRA (for LoRA-only servers): at a rank that holds every
    module's ΔW, the LoRA computes what the file does."""
    from peftkit import convert_to_lora

    save_file(_loha_file(), tmp_path / "loha.safetensors")
    model = load_lycoris(_unet(), tmp_path / "loha.safetensors", prefix="lora_unet")
    expected = _unet_out(model)
    result = convert_to_lora(model, rank=256)  # ≥ the smaller side of every adapted weight here
    got = _unet_out(result.apply(_unet()))
    assert result.max_error < 1e-6
    assert_rounding_close(got, expected, REL)
