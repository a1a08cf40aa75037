"""Image classification in `peftkit train`: image folders and tables of paths, transformers
vision models (ViT, ResNet, ConvNeXt) and plain PyTorch CNNs, LoRA on convolutions, and the
digits transfer example compared across methods."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.train import ConfigError, run_training
from peftkit.train.config import build_config

pytest.importorskip("accelerate")
PIL = pytest.importorskip("PIL.Image")
REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits"


def _squares(root: Path, per_class: int = 12, size: int = 16, seed: int = 0) -> Path:
    """An image folder: red and blue squares with noise, one sub-folder per colour."""
    g = torch.Generator().manual_seed(seed)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = torch.rand(size, size, 3, generator=g) * 90
            pixels[..., channel] += 150
            PIL.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(root / label / f"{i}.png")
    return root


def _vision_model_dir(root: Path, kind: str) -> Path:
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    if kind == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=37, num_labels=3))
    elif kind == "resnet":
        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    else:
        model = ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    out = root / kind
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


def _config(tmp_path: Path, **sections) -> object:
    raw = {"task": "image_classification", "output_dir": str(tmp_path / "run"),
           "train": {"batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, "log_every": 100, "seed": 0}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(raw)


def test_vit_learns_colours_from_an_image_folder_and_predicts(tmp_path, capsys):
    data = _squares(tmp_path / "train")
    val = _squares(tmp_path / "val", per_class=6, seed=1)
    model_dir = _vision_model_dir(tmp_path, "vit")
    cfg = _config(tmp_path, model={"name": str(model_dir)}, data={"train": str(data), "validation": str(val)},
                  method={"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                  train={"max_steps": 12})
    summary = run_training(cfg, quiet=True)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"]  # the new head trains beside the adapter
    assert summary["metric_before"]["accuracy"] <= 0.75
    assert summary["metric_after"]["accuracy"] == 1.0
    assert summary["throughput_unit"] == "images/s"
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["blue", "red"]
    from peftkit.cli import main

    paths = sorted(str(p) for p in (val / "red").glob("*.png"))[:3]
    listing = tmp_path / "to_predict.csv"
    listing.write_text("image\n" + "\n".join(paths) + "\n")
    assert main(["predict", str(tmp_path / "run"), "--input", str(listing)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t") for line in lines] == [["red", p] for p in paths]


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_lora_on_convolutions_of_transformers_cnns_round_trips(tmp_path, kind):
    from transformers import AutoModelForImageClassification

    model_dir = _vision_model_dir(tmp_path, kind)
    # ConvNeXt: its stem convolution and the point-wise linear layers
    targets = ["convolution"] if kind == "resnet" else ["patch_embeddings", "pwconv1"]
    model = get_peft_model(AutoModelForImageClassification.from_pretrained(model_dir),
                           LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    adapted = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    assert sum(isinstance(b, torch.nn.Conv2d) for b in adapted) >= 1
    assert all(isinstance(b, (torch.nn.Conv2d, torch.nn.Linear)) for b in adapted)
    pixels = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        want = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=pixels).logits, want)
        base = AutoModelForImageClassification.from_pretrained(model_dir).eval()(pixel_values=pixels).logits
    assert not torch.allclose(base, want)
    merged = again.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, want, atol=1e-5, rtol=1e-4)


def _digits(tmp_path: Path) -> Path:
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("make_digits", DIGITS / "make_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "digits"
    counts = module.write_folders(str(out))
    assert counts["pretrain/train"] + counts["pretrain/val"] + counts["transfer/train"] + counts["transfer/val"] == 1797
    accuracy = module.pretrain(str(out), epochs=4)
    assert accuracy > 0.8  # the pre-trained network knows digits 0-4
    return out


def test_digits_transfer_compares_head_top_stage_lora_and_full(tmp_path):
    import yaml

    from peftkit.train.compare import compare

    out = _digits(tmp_path)
    raw = yaml.safe_load((DIGITS / "transfer.yaml").read_text())
    raw["model"]["name"] = f"{DIGITS / 'cnn.py'}:small_cnn"
    raw["model"]["checkpoint"] = str(out / "cnn_0-4.safetensors")
    raw["data"] = {"train": str(out / "transfer" / "train"), "validation": str(out / "transfer" / "val"), "max_train_examples": 320}
    raw["train"].update(epochs=4, log_every=1000)
    raw["output_dir"] = str(tmp_path / "runs")
    config = tmp_path / "transfer.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = compare(str(config), ["head", "top1", "lora_conv", "full"], quiet=True)
    rows = {r.method: r for r in result["rows"]}
    assert all(r.status == "ok" for r in rows.values()), {k: r.note for k, r in rows.items()}
    assert rows["head"].trainable == 64 * 2 * 2 * 5 + 5  # the new head alone
    assert rows["lora_conv"].trainable < rows["top1"].trainable < rows["full"].trainable
    for r in rows.values():
        assert r.metric > 0.6, (r.method, r.metric)  # chance is 0.2
    assert len({round(r.metric, 4) for r in rows.values()}) > 1  # the methods differ
    assert (tmp_path / "runs" / "compare" / "compare.md").read_text().count("| ") > 10


def test_plain_cnn_checkpoint_head_and_errors(tmp_path):
    from safetensors.torch import save_file

    from peftkit.train.modeling import load_checkpoint

    spec = importlib.util.spec_from_file_location("cnn", DIGITS / "cnn.py")
    cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cnn)
    old = cnn.SmallCNN(5)
    save_file(old.state_dict(), str(tmp_path / "old.safetensors"))
    new = cnn.SmallCNN(7)  # another number of classes: the head keeps its fresh weights
    assert sorted(load_checkpoint(new, str(tmp_path / "old.safetensors"))) == ["head.bias", "head.weight"]
    assert torch.equal(new.stages[0].conv.weight, old.stages[0].conv.weight)
    same = cnn.SmallCNN(5)
    assert sorted(load_checkpoint(same, str(tmp_path / "old.safetensors"), exclude=["head"])) == ["head.bias", "head.weight"]
    assert not torch.equal(same.head.weight, old.head.weight)
    save_file({"trunk.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="holds 'trunk.weight', which the model does not have"):
        load_checkpoint(new, str(tmp_path / "other.safetensors"))

    data = _squares(tmp_path / "imgs", per_class=2)
    factory = f"{DIGITS / 'cnn.py'}:small_cnn"
    with pytest.raises(ConfigError, match="model.image_size is needed"):
        run_training(_config(tmp_path, model={"name": factory}, data={"train": str(data)}, method={"name": "full"}), quiet=True)
    table = tmp_path / "t.csv"
    table.write_text("picture,label\nimgs/red/0.png,red\n")
    with pytest.raises(ConfigError, match="has no column 'image'"):
        run_training(_config(tmp_path, model={"name": factory, "image_size": 8}, data={"train": str(table)}, method={"name": "full"}), quiet=True)
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        run_training(_config(tmp_path, model={"name": f"{DIGITS / 'cnn.py'}:nope", "image_size": 8}, data={"train": str(data)},
                             method={"name": "full"}), quiet=True)


def test_table_of_relative_paths_and_bitfit_on_a_cnn(tmp_path):
    _squares(tmp_path / "imgs", per_class=6)
    rows = [f"imgs/{c}/{i}.png,{c}" for c in ("red", "blue") for i in range(6)]
    table = tmp_path / "train.csv"
    table.write_text("image,label\n" + "\n".join(rows) + "\n")
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("cnn", DIGITS / "cnn.py")
    cnn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cnn)
    save_file(cnn.SmallCNN(5).state_dict(), str(tmp_path / "five.safetensors"))  # a 5-way head: 2 classes here
    cfg = _config(tmp_path, model={"name": f"{DIGITS / 'cnn.py'}:small_cnn", "image_size": 8, "image_channels": 1,
                                   "checkpoint": str(tmp_path / "five.safetensors")},
                  data={"train": str(table), "validation": str(table)},
                  method={"name": "bitfit"}, train={"max_steps": 10, "lr": 3e-2})
    summary = run_training(cfg, quiet=True)
    assert summary["trainable_parameters"] == 16 + 32 + 64 + (256 * 2 + 2)
    assert summary["metric_after"]["accuracy"] > summary["metric_before"]["accuracy"] or summary["metric_after"]["accuracy"] == 1.0


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_timm_and_torchvision_models_from_a_checkpoint(tmp_path, library):
    pytest.importorskip(library)
    from safetensors.torch import save_file

    if library == "timm":
        import timm

        name, source = "timm:resnet18", timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        from torchvision import models

        name, source = "torchvision:resnet18", models.resnet18(weights=None, num_classes=10)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    data = _squares(tmp_path / "imgs", per_class=4, size=40)
    cfg = _config(tmp_path, model={"name": name, "checkpoint": str(tmp_path / "weights.safetensors"), "image_size": 32},
                  data={"train": str(data), "validation": str(data)},
                  method={"name": "lora", "r": 2, "target_modules": ["conv2"]}, train={"max_steps": 2, "batch_size": 4})
    summary = run_training(cfg, quiet=True)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["fc"]  # the 10-way head replaced by a 2-way one, trained in full
    assert summary["steps"] == 2 and "accuracy" in summary["metric_after"]
