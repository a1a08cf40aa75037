"""LoRA for diffusion pipelines: diffusers LoRA files both ways (UNet and text encoder),
the UNet's adapter folder, the denoising loss, and `peftkit train` task text_to_image."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModel

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.integrations.diffusers import (
    LORA_WEIGHT_NAME,
    DiffusersLoraError,
    load_lora_weights,
    read_lora_weights,
    save_lora_weights,
)
from peftkit.train import ConfigError, run_training
from peftkit.train.config import build_config

REPO = Path(__file__).resolve().parents[1]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _demo_module():
    spec = importlib.util.spec_from_file_location("make_diffusion_demo", REPO / "examples" / "make_diffusion_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _demo_module()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return demo.build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


def _unet(path: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()


def _text_encoder(path: Path) -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()


def _pipeline(path: Path) -> StableDiffusionPipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionPipeline.from_pretrained(path, safety_checker=None)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700])
    token_ids = torch.randint(2, 54, (2, 16), generator=g)
    return latents, timesteps, token_ids


@torch.no_grad()
def _outputs(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    latents, timesteps, token_ids = _inputs()
    states = text_encoder(token_ids)[0]
    return states, unet(latents, timesteps, states).sample


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Makes both LoRA factors non-trivial, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# -- peftkit -> diffusers -------------------------------------------------------------------


def test_unet_and_text_encoder_lora_load_in_diffusers(pipeline_dir, tmp_path):
    unet = get_peft_model(_unet(pipeline_dir), LoraConfig(
        r=4, lora_alpha=6, target_modules=UNET_TARGETS, rank_pattern={"attn2.to_k": 2},
        alpha_pattern={"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 3}))
    text_encoder = get_peft_model(_text_encoder(pipeline_dir), LoraConfig(r=2, lora_alpha=5, target_modules=TEXT_TARGETS, use_rslora=True))
    _perturb(unet, 1)
    _perturb(text_encoder, 2)
    path = save_lora_weights(tmp_path / "lora", unet=unet, text_encoder=text_encoder)
    assert Path(path).name == LORA_WEIGHT_NAME
    with safe_open(path, framework="pt") as fh:
        keys = list(fh.keys())
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)

    pipe = _pipeline(pipeline_dir)
    base_states, base_out = _outputs(pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(tmp_path / "lora")
    states, out = _outputs(unet, text_encoder)
    pipe_states, pipe_out = _outputs(pipe.unet, pipe.text_encoder)
    # the adapters change the outputs, and diffusers reproduces peftkit's
    assert (states - base_states).abs().max() > 1e-2 and (out - base_out).abs().max() > 1e-2
    torch.testing.assert_close(pipe_states, states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe_out, out, atol=1e-5, rtol=1e-5)

    # and peftkit reads its own file back
    loaded = load_lora_weights(tmp_path / "lora", unet=_unet(pipeline_dir), text_encoder=_text_encoder(pipeline_dir))
    again_states, again_out = _outputs(loaded["unet"], loaded["text_encoder"])
    torch.testing.assert_close(again_states, states, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again_out, out, atol=1e-6, rtol=1e-6)
    assert loaded["unet"].peft_config["default"].rank_for("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == 2


def test_export_refuses_what_diffusers_cannot_load(pipeline_dir, tmp_path):
    with_bias = get_peft_model(_unet(pipeline_dir), LoraConfig(r=2, target_modules=["to_q"], bias="lora_only"))
    with pytest.raises(DiffusersLoraError, match="bias"):
        save_lora_weights(tmp_path, unet=with_bias)
    with pytest.raises(DiffusersLoraError, match="no LoRA adapter"):
        save_lora_weights(tmp_path, unet=_unet(pipeline_dir))
    with pytest.raises(DiffusersLoraError, match="at least one"):
        save_lora_weights(tmp_path)


def test_unet_adapter_folder_round_trips_with_peft(pipeline_dir, tmp_path):
    """peftkit's own adapter folder for a UNet: read back by peftkit and by Hugging Face PEFT."""
    import peft

    unet = get_peft_model(_unet(pipeline_dir), LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    _perturb(unet, 3)
    unet.save_pretrained(tmp_path / "adapter")
    text_encoder = _text_encoder(pipeline_dir)
    _, expected = _outputs(unet, text_encoder)
    _, ours = _outputs(PeftModel.from_pretrained(_unet(pipeline_dir), tmp_path / "adapter"), text_encoder)
    _, theirs = _outputs(peft.PeftModel.from_pretrained(_unet(pipeline_dir), str(tmp_path / "adapter")), text_encoder)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)


# -- diffusers / PEFT -> peftkit ---------------------------------------------------------------


def _peft_lora_file(pipeline_dir: Path, folder: Path, with_metadata: bool) -> tuple:
    """A LoRA trained the diffusers way (PEFT adapters added to the UNet and text encoder),
    saved with StableDiffusionPipeline.save_lora_weights."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict as peft_state_dict

    unet, text_encoder = _unet(pipeline_dir), _text_encoder(pipeline_dir)
    unet_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False)
    text_config = PeftLoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False)
    torch.manual_seed(5)
    unet.add_adapter(unet_config)  # diffusers' own way of adding a LoRA to its models
    inject_adapter_in_model(text_config, text_encoder)  # what transformers' add_adapter does
    extra = {"unet_lora_adapter_metadata": unet_config.to_dict(), "text_encoder_lora_adapter_metadata": text_config.to_dict()} if with_metadata else {}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=peft_state_dict(unet),
                                              text_encoder_lora_layers=peft_state_dict(text_encoder), **extra)
    return unet, text_encoder


def test_diffusers_lora_file_with_metadata_loads_into_peftkit(pipeline_dir, tmp_path):
    unet, text_encoder = _peft_lora_file(pipeline_dir, tmp_path, with_metadata=True)
    expected_states, expected = _outputs(unet, text_encoder)
    loaded = load_lora_weights(tmp_path, unet=_unet(pipeline_dir), text_encoder=_text_encoder(pipeline_dir))
    assert isinstance(loaded["unet"], PeftModel) and loaded["unet"].peft_config["default"].lora_alpha == 8
    states, out = _outputs(loaded["unet"], loaded["text_encoder"])
    torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_diffusers_lora_file_without_metadata_loads_as_diffusers_does(pipeline_dir, tmp_path):
    """Without metadata diffusers takes α = r (scale 1); peftkit reads the file the same way."""
    _peft_lora_file(pipeline_dir, tmp_path, with_metadata=False)
    pipe = _pipeline(pipeline_dir)
    pipe.load_lora_weights(tmp_path)
    expected_states, expected = _outputs(pipe.unet, pipe.text_encoder)
    adapters = read_lora_weights(tmp_path / LORA_WEIGHT_NAME)
    assert adapters["unet"][0].lora_alpha == adapters["unet"][0].r == 4
    loaded = load_lora_weights(tmp_path, unet=_unet(pipeline_dir), text_encoder=_text_encoder(pipeline_dir))
    states, out = _outputs(loaded["unet"], loaded["text_encoder"])
    torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_older_diffusers_key_names_are_read(pipeline_dir, tmp_path):
    """Files of older diffusers versions: attention-processor names and lora.down/up."""
    from safetensors.torch import load_file, save_file

    unet = get_peft_model(_unet(pipeline_dir), LoraConfig(r=2, lora_alpha=2, target_modules=UNET_TARGETS))
    text_encoder = get_peft_model(_text_encoder(pipeline_dir), LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_TARGETS))
    _perturb(unet, 7)
    _perturb(text_encoder, 8)
    current = load_file(save_lora_weights(tmp_path / "new", unet=unet, text_encoder=text_encoder))
    old = {}
    for key, tensor in current.items():
        factor = "down" if ".lora_A." in key else "up"
        module = key.split(".lora_")[0]
        if key.startswith("unet."):
            parent, _, proj = module.removesuffix(".0").rpartition(".")
            old[f"{parent}.processor.{proj}_lora.{factor}.weight"] = tensor
        else:
            old[f"text_encoder.text_model.{module.removeprefix('text_encoder.')}.lora_linear_layer.{factor}.weight"] = tensor
    assert any(".processor.to_out_lora.up.weight" in k for k in old)
    save_file(old, str(tmp_path / LORA_WEIGHT_NAME))  # no metadata: scale 1, as α = r here
    loaded = load_lora_weights(tmp_path, unet=_unet(pipeline_dir), text_encoder=_text_encoder(pipeline_dir))
    expected_states, expected = _outputs(unet, text_encoder)
    states, out = _outputs(loaded["unet"], loaded["text_encoder"])
    torch.testing.assert_close(states, expected_states, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_reading_bad_files_names_the_problem(pipeline_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 32)}, str(tmp_path / LORA_WEIGHT_NAME))
    with pytest.raises(DiffusersLoraError, match="kohya"):
        read_lora_weights(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=LORA_WEIGHT_NAME):
        read_lora_weights(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither"):
        read_lora_weights(tmp_path / "missing")
    _peft_lora_file(pipeline_dir, tmp_path / "ok", with_metadata=True)
    with pytest.raises(DiffusersLoraError, match="text_encoder"):
        load_lora_weights(tmp_path / "ok", unet=_unet(pipeline_dir))


# -- the training task -------------------------------------------------------------------------


def _config(pipeline_dir: Path, data_dir: Path, out: Path, **train) -> dict:
    train_cfg = {"max_steps": 24, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-2, "weight_decay": 0.0,
                 "warmup_ratio": 0.0, "schedule": "constant", "eval_every": 12, "log_every": 1, "seed": 0,
                 "mixed_precision": "no"}
    train_cfg.update(train)
    return {"task": "text_to_image", "model": {"name": str(pipeline_dir)},
            "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl")},
            "method": {"name": "lora", "r": 4, "lora_alpha": 4, "target_modules": UNET_TARGETS + TEXT_TARGETS},
            "train": train_cfg, "output_dir": str(out)}


def test_denoising_loss_targets(pipeline_dir, tmp_path):
    """Epsilon and v-prediction targets, and fixed draws in evaluation."""
    from diffusers import DDPMScheduler

    from peftkit.train.tasks.diffusion import TextToImageModel

    for kind in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler", prediction_type=kind)
        model = TextToImageModel(_unet(pipeline_dir), _text_encoder(pipeline_dir), scheduler).eval()
        mean, std = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
        _, _, ids = _inputs()
        seeds = torch.tensor([3, 4])
        with torch.no_grad():
            out = model(mean, std, ids, seeds)
            eps, noise, t = model.draws(mean, seeds)
            z = mean + std * eps
            a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * z + (1 - a).sqrt() * noise
            target = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
            pred = model.unet(noisy, t, model.text_encoder(ids)[0]).sample
        torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(pred, target), atol=1e-5, rtol=1e-5)
        assert torch.equal(model(mean, std, ids, seeds).loss, out.loss)  # evaluation draws are fixed
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(mean, std, ids, seeds).loss, out.loss)  # training draws are fresh


def test_training_lowers_the_loss_and_writes_a_diffusers_file(pipeline_dir, tmp_path):
    data_dir = tmp_path / "data"
    demo.make_pairs(data_dir, n_train=8, n_validation=4)
    cfg = build_config(_config(pipeline_dir, data_dir, tmp_path / "run"))
    summary = run_training(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    assert summary["metric_after"]["eval_loss"] < summary["metric_before"]["eval_loss"]

    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / LORA_WEIGHT_NAME).is_file()
    # the run's best adapter, loaded by peftkit, equals the diffusers file loaded by a pipeline
    from peftkit.train.run import Prepared

    run = Prepared(cfg, None)
    model = PeftModel.from_pretrained(run.model, adapter).get_base_model()
    pipe = _pipeline(pipeline_dir)
    pipe.load_lora_weights(adapter)
    states, out = _outputs(model.unet, model.text_encoder)
    pipe_states, pipe_out = _outputs(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(pipe_states, states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe_out, out, atol=1e-5, rtol=1e-5)
    # the kohya file beside it loads the same
    pipe = _pipeline(pipeline_dir)
    pipe.load_lora_weights(adapter / "lora.safetensors")
    torch.testing.assert_close(_outputs(pipe.unet, pipe.text_encoder)[1], out, atol=1e-5, rtol=1e-5)
    # peftkit convert (here to a LoRA of rank 2) writes the run's diffusers file for the result too
    from peftkit.cli import main

    assert main(["convert", str(tmp_path / "run"), "--to", "lora", "--rank", "2"]) == 0
    converted = tmp_path / "run" / "adapter_lora_r2"
    assert (converted / LORA_WEIGHT_NAME).is_file() and (converted / "lora.safetensors").is_file()
    pipe = _pipeline(pipeline_dir)
    pipe.load_lora_weights(converted)
    expected = PeftModel.from_pretrained(Prepared(cfg, None).model, converted).get_base_model()
    torch.testing.assert_close(_outputs(pipe.unet, pipe.text_encoder)[1], _outputs(expected.unet, expected.text_encoder)[1],
                               atol=1e-5, rtol=1e-5)
    # evaluation of the saved adapter reproduces the best validation loss
    items = run.encode_all(run.task.read(cfg.data.validation, cfg.data))
    result = run.evaluate(PeftModel.from_pretrained(Prepared(cfg, None).model, adapter), items)
    assert result["eval_loss"] == pytest.approx(summary["metric_after"]["eval_loss"], rel=1e-5)


def test_image_folder_captions_and_config_errors(pipeline_dir, tmp_path):
    from peftkit.train.plugins import get_task

    task = get_task("text_to_image")
    folder = tmp_path / "folder"
    for caption in ("red_square", "blue_circle"):
        (folder / caption).mkdir(parents=True)
        demo.draw("red" if "red" in caption else "blue", caption.split("_")[1], __import__("random").Random(0)).save(folder / caption / "0.png")
    cfg = build_config(_config(pipeline_dir, tmp_path, tmp_path / "run") | {"data": {"train": str(folder)}})
    records = task.read(str(folder), cfg.data)
    assert sorted(r["caption"] for r in records) == ["blue circle", "red square"]
    task.check_records(records, str(folder), cfg.data)

    with pytest.raises(ConfigError, match="data.caption_column"):
        task.check_records([{"image": "x.png", "text": "a"}], "t.jsonl", cfg.data)
    with pytest.raises(ConfigError, match="captions must be text"):
        task.check_records([{"image": "x.png", "caption": 3}], "t.jsonl", cfg.data)
    (tmp_path / "not_a_pipeline" / "unet").mkdir(parents=True)
    bad = build_config(_config(tmp_path / "not_a_pipeline", tmp_path, tmp_path / "run") | {"data": {"train": str(folder)}})
    with pytest.raises(ConfigError, match=r"lacks \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        task.load(bad, None)


# -- kohya / A1111 files -----------------------------------------------------------------------

# Every kind of layer of the UNet that kohya-style LoRA (LoCon included) adapts: attention and
# feed-forward projections, the 1×1 projection convolutions, resnet convolutions, shortcuts,
# time-embedding projections, down/upsamplers and the outer convolutions.
KOHYA_UNET_TARGETS = [*UNET_TARGETS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj",
                      "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]


def test_kohya_file_written_by_peftkit_loads_in_diffusers(pipeline_dir, tmp_path):
    from peftkit.integrations.kohya import load_kohya_lora_weights, save_kohya_lora_weights

    unet = get_peft_model(_unet(pipeline_dir), LoraConfig(
        r=4, lora_alpha=6, target_modules=KOHYA_UNET_TARGETS, rank_pattern={"attn2.to_k": 2},
        alpha_pattern={"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 3}))
    text_encoder = get_peft_model(_text_encoder(pipeline_dir), LoraConfig(
        r=2, lora_alpha=5, target_modules=[*TEXT_TARGETS, "fc1", "fc2"], use_rslora=True))
    _perturb(unet, 11)
    _perturb(text_encoder, 12)
    path = save_kohya_lora_weights(tmp_path / "style.safetensors", unet=unet, text_encoder=text_encoder)
    with safe_open(path, framework="pt") as fh:
        keys = set(fh.keys())
        q_alpha = fh.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
        conv_down = fh.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert len(keys) == 3 * (83 + 12)  # every Linear and Conv2d of the UNet, 6 linears × 2 layers of the text encoder
    assert q_alpha.item() == pytest.approx(5 / 2**0.5 * 2)  # α/r of the file = the rank-stabilised α/√r
    assert tuple(conv_down.shape) == (4, 32, 3, 3)

    pipe = _pipeline(pipeline_dir)
    base_states, base_out = _outputs(pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(path)
    states, out = _outputs(unet, text_encoder)
    pipe_states, pipe_out = _outputs(pipe.unet, pipe.text_encoder)
    assert (states - base_states).abs().max() > 1e-2 and (out - base_out).abs().max() > 1e-2
    torch.testing.assert_close(pipe_states, states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe_out, out, atol=1e-5, rtol=1e-5)

    # peftkit reads its file back, by the kohya reader and by the diffusers entry point (the
    # modules whose α was folded into their factors round differently: not to the bit)
    for loaded in (load_kohya_lora_weights(path, unet=_unet(pipeline_dir), text_encoder=_text_encoder(pipeline_dir)),
                   load_lora_weights(path, unet=_unet(pipeline_dir), text_encoder=_text_encoder(pipeline_dir))):
        again_states, again_out = _outputs(loaded["unet"], loaded["text_encoder"])
        torch.testing.assert_close(again_states, states, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again_out, out, atol=1e-5, rtol=1e-5)
    assert loaded["unet"].peft_config["default"].rank_for("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == 2


def test_kohya_text_encoder_file_without_out_proj_loads_in_diffusers(pipeline_dir, tmp_path):
    """diffusers tells a text encoder's key kind by an out_proj entry; a LoRA on q/v (and the
    MLP) alone gets a rank-1 zero LoRA on one out_proj, which changes nothing."""
    from peftkit.integrations.kohya import save_kohya_lora_weights

    text_encoder = get_peft_model(_text_encoder(pipeline_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "fc1"]))
    _perturb(text_encoder, 41)
    path = save_kohya_lora_weights(tmp_path, text_encoder=text_encoder)
    with safe_open(path, framework="pt") as fh:
        marker = fh.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight")
    assert tuple(marker.shape) == (32, 1) and not marker.any()
    pipe = _pipeline(pipeline_dir)
    pipe.load_lora_weights(path)
    token_ids = _inputs()[2]
    with torch.no_grad():
        expected, base = text_encoder(token_ids)[0], _text_encoder(pipeline_dir)(token_ids)[0]
        got = pipe.text_encoder(token_ids)[0]
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kohya_files_of_another_writer_read_as_diffusers_reads_them(pipeline_dir, tmp_path):
    """Files laid out as sd-scripts writes them, per-module ranks, a 1×1 projection convolution:
    (a) an α per module, differing on UNet modules other than attention projections (the only
    place diffusers 0.42 honours an α that is not the file's most common); (b) no α at all
    (α = r, scale 1). peftkit and diffusers give the same pipeline."""
    from safetensors.torch import save_file

    entries = {  # module path -> (rank, alpha, in, out)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, 2.0, 32, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (2, 2.0, 32, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": (3, 2.0, 32, 32),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (4, 8.0, 64, 512),
        "lora_unet_up_blocks_1_attentions_1_proj_in": (2, 1.0, 32, 32),  # a 1×1 Conv2d: (r, in, 1, 1), (out, r, 1, 1)
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj": (3, 0.5, 128, 32),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (2, 2.0, 32, 32),
        # (diffusers misreads a text encoder's entries unless one is an out_proj)
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj": (2, 2.0, 32, 32),
        "lora_te_text_model_encoder_layers_0_mlp_fc2": (3, 2.0, 64, 32),  # (a differing α is dropped there)
    }
    for with_alpha in (True, False):
        g = torch.Generator().manual_seed(21)
        tensors = {}
        for name, (r, alpha, fan_in, fan_out) in entries.items():
            conv = (1, 1) if name.endswith("proj_in") else ()
            tensors[f"{name}.lora_down.weight"] = torch.randn(r, fan_in, *conv, generator=g) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, r, *conv, generator=g) * 0.3
            if with_alpha:
                tensors[f"{name}.alpha"] = torch.tensor(alpha)
        file = tmp_path / f"other_{with_alpha}.safetensors"
        save_file(tensors, str(file))

        pipe = _pipeline(pipeline_dir)
        base_states, base_out = _outputs(pipe.unet, pipe.text_encoder)
        pipe.load_lora_weights(file)
        expected_states, expected = _outputs(pipe.unet, pipe.text_encoder)
        loaded = load_lora_weights(file, unet=_unet(pipeline_dir), text_encoder=_text_encoder(pipeline_dir))
        config = loaded["unet"].peft_config["default"]
        assert config.alpha_for("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj") == (8.0 if with_alpha else 4)
        states, out = _outputs(loaded["unet"], loaded["text_encoder"])
        assert (expected - base_out).abs().max() > 1e-2 and (expected_states - base_states).abs().max() > 1e-2
        torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_kohya_sdxl_prefixes_and_refusals(pipeline_dir, tmp_path):
    from safetensors.torch import save_file

    from peftkit.integrations.kohya import load_kohya_lora_weights, save_kohya_lora_weights

    first = get_peft_model(_text_encoder(pipeline_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    second = get_peft_model(_text_encoder(pipeline_dir), LoraConfig(r=3, target_modules=["v_proj"]))
    _perturb(first, 31)
    _perturb(second, 32)
    path = save_kohya_lora_weights(tmp_path / "xl", text_encoder=first, text_encoder_2=second)
    with safe_open(path, framework="pt") as fh:
        keys = set(fh.keys())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in keys
    loaded = load_kohya_lora_weights(path, text_encoder=_text_encoder(pipeline_dir), text_encoder_2=_text_encoder(pipeline_dir))
    _, ids = _inputs()[1:]
    with torch.no_grad():
        for name, model in (("text_encoder", first), ("text_encoder_2", second)):
            torch.testing.assert_close(loaded[name](ids)[0], model(ids)[0], atol=1e-6, rtol=1e-6)

    with pytest.raises(DiffusersLoraError, match="text_encoder_2"):
        load_kohya_lora_weights(path, text_encoder=_text_encoder(pipeline_dir))
    dora = get_peft_model(_unet(pipeline_dir), LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(DiffusersLoraError, match="DoRA"):
        save_kohya_lora_weights(tmp_path / "dora", unet=dora)
    bad = {
        "lycoris": ({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, "LyCORIS"),
        "sdxl ldm names": ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 32),
                            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 2)}, "LDM"),
        "half a pair": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "lora_up"),
    }
    for name, (tensors, message) in bad.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(DiffusersLoraError, match=message):
            load_lora_weights(tmp_path / f"{name}.safetensors", unet=_unet(pipeline_dir))


def test_ia3_unet_converted_to_lora_reaches_diffusers_as_a_kohya_file(pipeline_dir, tmp_path):
    """Any mergeable method's result, here (IA)³ on the UNet, goes to a LoRA-only loader:
    convert_to_lora at full rank, then a kohya file that diffusers loads."""
    from peftkit import IA3Config, convert_to_lora
    from peftkit.integrations.kohya import save_kohya_lora_weights

    ia3 = get_peft_model(_unet(pipeline_dir), IA3Config(target_modules=["to_q", "to_k", "to_v", "ff.net.2"],
                                                        feedforward_modules=["ff.net.2"]))
    _perturb(ia3, 51)
    text_encoder = _text_encoder(pipeline_dir)
    _, expected = _outputs(ia3, text_encoder)
    result = convert_to_lora(ia3, rank=64, bias="none")
    assert result.max_error < 1e-6  # no bias changed: to_q/k/v have none, ff.net.2's input is scaled
    path = save_kohya_lora_weights(tmp_path, unet=result.apply(_unet(pipeline_dir)))
    pipe = _pipeline(pipeline_dir)
    _, base = _outputs(pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(path)
    _, got = _outputs(pipe.unet, pipe.text_encoder)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
