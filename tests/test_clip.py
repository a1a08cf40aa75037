"""`peftkit train` task `clip`: contrastive image-caption fine-tuning of a tiny CLIPModel
with LoRA on both towers, zero-shot evaluation and prediction, adapter files that load in
peftkit and in Hugging Face PEFT, and clear errors for bad data."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adapter_checks import INTEROP_REL, assert_rounding_close
from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.cli import main as cli_main
from peftkit.train import ConfigError, run_training
from peftkit.train.config import build_config
from peftkit.train.data import prepare_task_data
from peftkit.train.plugins import get_task
from peftkit.train.run import Prepared
from peftkit.train.tasks.clip import contrastive_loss, image_embeddings, text_embeddings

pytest.importorskip("accelerate")
pytest.importorskip("PIL")
transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
from make_clip_demo import COLOURS, build_tiny_clip, draw, make_pairs  # noqa: E402

LORA = {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "modules_to_save": ["visual_projection", "text_projection"]}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    model = build_tiny_clip(root / "tiny-clip")
    train, validation = make_pairs(root, 64, "train", seed=1), make_pairs(root, 32, "validation", seed=2)
    folder = root / "folder"  # one sub-folder per class, no captions
    rng = random.Random(3)
    for colour in ("red", "blue"):
        (folder / colour).mkdir(parents=True)
        for i in range(8):
            draw(colour, rng.choice(["square", "circle"]), rng).save(folder / colour / f"{i}.png")
    return {"root": root, "model": str(model), "train": str(train), "validation": str(validation), "folder": str(folder)}


def _raw(ws, out: Path, data: dict | None = None, **train) -> dict:
    return {
        "task": "clip",
        "model": {"name": ws["model"]},
        "data": data or {"train": ws["train"], "validation": ws["validation"], "caption_template": "a {label} shape."},
        "method": dict(LORA),
        "train": {"epochs": 10, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.1, "seed": 0, "log_every": 2,
                  "mixed_precision": "no", **train},
        "output_dir": str(out),
    }


@pytest.fixture(scope="module")
def pairs_run(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs_run")
    summary = run_training(build_config(_raw(ws, out)), quiet=True)
    return out, summary


def _clip(ws):
    return transformers.CLIPModel.from_pretrained(ws["model"]).eval()


def _inputs(ws):
    """Token ids of two captions and pixels of two images, through the saved processor."""
    processor = transformers.CLIPProcessor.from_pretrained(ws["model"])
    rng = random.Random(7)
    images = [draw("red", "square", rng), draw("blue", "circle", rng)]
    return processor(text=["a red square.", "a blue circle."], images=images, return_tensors="pt", padding=True)


def _embeddings(model, enc) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (image_embeddings(model, enc["pixel_values"]), text_embeddings(model, enc["input_ids"], enc["attention_mask"]))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- the loss -----------------------------------------------------------------------------
def test_contrastive_loss_is_clips_loss_without_duplicate_captions(ws):
    model, enc = _clip(ws), _inputs(ws)
    with torch.no_grad():
        out = model(**enc, return_loss=True)
    ours = contrastive_loss(out.logits_per_image, torch.arange(2))
    assert torch.allclose(ours, out.loss, atol=1e-6)


def test_duplicate_captions_are_one_target():
    # three images, two distinct captions: images 0 and 2 share caption 0
    logits = torch.tensor([[2.0, 0.5], [0.1, 1.5], [1.0, -0.5]])
    caption_ids = torch.tensor([0, 1, 0])
    image_side = torch.nn.functional.cross_entropy(logits, caption_ids)
    to_images = logits.t().softmax(-1)  # each caption's distribution over the images
    text_side = -(torch.log(to_images[0, 0] + to_images[0, 2]) + torch.log(to_images[1, 1])) / 2
    assert torch.allclose(contrastive_loss(logits, caption_ids), (image_side + text_side) / 2)
    # the loss can reach zero with duplicates (no contradictory targets)
    perfect = torch.tensor([[50.0, -50.0], [-50.0, 50.0], [50.0, -50.0]])
    assert float(contrastive_loss(perfect, caption_ids)) < 1e-6


# -- default targets ------------------------------------------------------------------------
def test_default_targets_cover_both_towers(ws):
    lora = get_peft_model(_clip(ws), LoraConfig(r=4))
    names = [n for n, m in lora.named_modules() if hasattr(m, "lora_A")]
    assert any(".text_model." in n for n in names) and any(".vision_model." in n for n in names)
    assert lora.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    every = get_peft_model(_clip(ws), LoraConfig(r=4, target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in every.named_modules() if hasattr(m, "lora_A")}
    assert {"visual_projection", "text_projection", "fc1", "fc2", "out_proj"} <= adapted
    ia3 = get_peft_model(_clip(ws), IA3Config())
    assert ia3.peft_config["default"].feedforward_modules == ["fc2"]


# -- a run on image-caption pairs with labels ---------------------------------------------------
def test_pairs_run_learns_and_reports_zero_shot(pairs_run):
    out, summary = pairs_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    before, after = summary["metric_before"], summary["metric_after"]
    assert set(after) >= {"eval_loss", "accuracy", "f1", "i2t_recall@1", "t2i_recall@1"}
    assert after["eval_loss"] < before["eval_loss"]
    assert after["accuracy"] >= 0.75 and after["accuracy"] > before["accuracy"] + 0.3, (before, after)  # 4 colours: chance 0.25
    assert json.loads((out / "labels.json").read_text()) == sorted(COLOURS)
    assert summary["trainable_parameters"] == 16 * 8 * (32 + 32) + 2 * 32 * 32  # LoRA on 16 layers + both projections


def test_saved_adapter_reloads_exactly_and_scores_as_reported(ws, pairs_run):
    out, summary = pairs_run
    enc = _inputs(ws)
    base_images, base_texts = _embeddings(_clip(ws), enc)
    first = _embeddings(PeftModel.from_pretrained(_clip(ws), out / "adapter").eval(), enc)
    second = _embeddings(PeftModel.from_pretrained(_clip(ws), out / "adapter").eval(), enc)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.allclose(first[0], base_images) and not torch.allclose(first[1], base_texts)
    # the saved adapter is the best evaluation's model: `peftkit eval` reproduces its metrics
    cfg = build_config(json.loads(json.dumps(_raw(ws, out))))
    data = prepare_task_data(get_task(cfg.task), cfg.data, 0)
    run = Prepared(cfg, data.labels)
    result = run.evaluate(PeftModel.from_pretrained(run.model, out / "adapter"), run.encode_all(data.validation))
    for key, value in summary["metric_after"].items():
        assert result[key] == pytest.approx(value, abs=1e-5), key


def test_run_adapter_loads_in_hugging_face_peft(ws, pairs_run):
    peft = pytest.importorskip("peft")
    out, _ = pairs_run
    enc = _inputs(ws)
    ours = _embeddings(PeftModel.from_pretrained(_clip(ws), out / "adapter").eval(), enc)
    theirs = _embeddings(_quiet(peft.PeftModel.from_pretrained, _clip(ws), out / "adapter").eval(), enc)
    assert_rounding_close(ours[0], theirs[0], INTEROP_REL)  # two libraries: within float32 rounding
    assert_rounding_close(ours[1], theirs[1], INTEROP_REL)


def test_peft_adapter_loads_in_peftkit(ws, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["text_projection"],
                             init_lora_weights=False)
    theirs = _quiet(peft.get_peft_model, _clip(ws), config).eval()
    with torch.no_grad():
        theirs.base_model.model.text_projection.modules_to_save["default"].weight.mul_(1.5)
    enc = _inputs(ws)
    expected = _embeddings(theirs, enc)
    _quiet(theirs.save_pretrained, tmp_path)
    ours = _embeddings(PeftModel.from_pretrained(_clip(ws), tmp_path).eval(), enc)
    assert_rounding_close(ours[0], expected[0], INTEROP_REL)
    assert_rounding_close(ours[1], expected[1], INTEROP_REL)


def test_cli_eval_and_predict(ws, pairs_run, capsys):
    out, summary = pairs_run
    assert cli_main(["eval", str(out), "--data", ws["validation"]]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 32 and result["accuracy"] == pytest.approx(summary["metric_after"]["accuracy"])
    assert cli_main(["predict", str(out), "--input", ws["validation"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 32
    right = 0
    for line in lines:
        label, path = line.split("\t")
        assert label in COLOURS and Path(path).is_file()
        right += Path(path).stem.split("_")[1] == label
    assert right / 32 == pytest.approx(summary["metric_after"]["accuracy"])


# -- a class folder (captions from the template) and data without labels ----------------------
def test_image_folder_captions_come_from_the_template(ws, tmp_path):
    raw = _raw(ws, tmp_path, data={"train": ws["folder"], "validation": ws["folder"], "caption_template": "a {label} shape."},
               epochs=6, batch_size=8)
    cfg = build_config(raw)
    data = prepare_task_data(get_task(cfg.task), cfg.data, 0)
    run = Prepared(cfg, data.labels)
    assert data.labels == ["blue", "red"] and run.metric == "accuracy"
    batch = run.collate(run.encode_all(data.train[6:10]))  # blue, red, blue, red (class folders interleave)
    assert batch["input_ids"].shape[0] == 2 and batch["caption_ids"].tolist() == [0, 1, 0, 1]
    prompt = run.processor.tokens("a blue shape.")
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt and batch["attention_mask"][0].sum() == len(prompt)
    summary = run_training(cfg, quiet=True)
    assert summary["metric_after"]["accuracy"] == 1.0 and summary["metric_before"]["accuracy"] < 1.0
    # with templated captions, retrieving an image's caption is zero-shot classification
    assert summary["metric_after"]["i2t_recall@1"] == summary["metric_after"]["accuracy"]


def test_pairs_without_labels_select_by_loss(ws, tmp_path):
    table = tmp_path / "pairs.jsonl"
    root = Path(ws["train"]).parent
    rows = [line.split(",") for line in Path(ws["train"]).read_text().splitlines()[1:17]]
    table.write_text("".join(json.dumps({"picture": str(root / r[0]), "text": r[1]}) + "\n" for r in rows))
    raw = _raw(ws, tmp_path / "run", data={"train": str(table), "validation": str(table), "image_column": "picture",
                                           "caption_column": "text"}, max_steps=2, batch_size=8)
    cfg = build_config(raw)
    assert prepare_task_data(get_task(cfg.task), cfg.data, 0).labels is None
    assert Prepared(cfg, None).metric == "eval_loss"  # the best checkpoint is picked by the contrastive loss
    summary = run_training(cfg, quiet=True)
    assert "accuracy" not in summary["metric_after"] and "i2t_recall@1" in summary["metric_after"]
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) is None
    assert cli_main(["predict", str(tmp_path / "run"), "--input", str(table)]) == 2  # zero-shot needs labels


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["no_image_column", "no_caption_no_label", "template", "partial_labels", "missing_file"])
def test_bad_data_is_refused_with_the_fix(ws, tmp_path, case):
    table = tmp_path / "bad.jsonl"
    image = str(Path(ws["root"]) / "images" / "train" / sorted((Path(ws["root"]) / "images" / "train").iterdir())[0].name)
    rows = {"no_image_column": [{"img": image, "caption": "x"}],
            "no_caption_no_label": [{"image": image, "caption": "x"}, {"image": image}],
            "template": [{"image": image, "caption": "x"}],
            "partial_labels": [{"image": image, "caption": "x", "label": "red"}, {"image": image, "caption": "y"}],
            "missing_file": [{"image": "nowhere.png", "caption": "x"}]}[case]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(table)} | ({"caption_template": "a photo"} if case == "template" else {})
    expected = {"no_image_column": "no column 'image'", "no_caption_no_label": "record 2 has neither a caption",
                "template": "must contain {label}", "partial_labels": "some training records have no 'label'",
                "missing_file": "nowhere.png"}[case]
    with pytest.raises(ConfigError, match=expected.replace("{", r"\{").replace("}", r"\}")):
        run_training(build_config(_raw(ws, tmp_path / "out", data=data, max_steps=1)), quiet=True)
