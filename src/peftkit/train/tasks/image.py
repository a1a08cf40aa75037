"""Image classification: transformers vision models (ViT, ConvNeXt, ResNet, ...), timm and
torchvision models, and plain PyTorch modules; data from an image folder (one sub-folder
per class), a table of image paths and labels (CSV/JSONL/Parquet), or a saved ``datasets``
dataset with an image column."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.train.modeling import build_from_factory, is_factory, load_checkpoint, transformers_source
from peftkit.train.schema import ConfigError, DataSection, RunConfig
from peftkit.train.tasks.base import (
    Batch,
    CheckpointModel,
    ClassData,
    Item,
    Task,
    add_class_labels,
    class_encoder,
    class_labels,
    infer_labels,
    logits_of,
    require_column,
)

__all__ = ["ImageClassificationTask", "ImagePreprocessor", "read_image_folder", "read_image_table"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# ImageNet statistics: the usual normalisation of pretrained vision models
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image_folder(path: str, image_column: str = "image", label_column: str = "label") -> list[dict[str, Any]] | None:
    """Records ``{image: file path, label: sub-folder name}`` of a folder with one sub-folder
    per class (classes interleaved); None when ``path`` is not laid out that way."""
    from peftkit.train.data import read_class_folders

    return read_class_folders(path, IMAGE_EXTENSIONS, image_column, label_column) or None


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("image tasks need Pillow: `pip install pillow`") from exc
    return Image


class ImagePreprocessor:
    """Image -> ``(channels, size, size)`` float tensor: shorter side resized to
    ``size / crop_pct``, centre crop, scaled to [0, 1], normalised by ``mean``/``std``
    (the usual evaluation transform of timm and torchvision models)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3, crop_pct: float = 1.0) -> None:
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"image mean/std need {channels} values (one per channel), got {list(mean)} and {list(std)}")
        self.size, self.channels, self.crop_pct = size, channels, crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # modules the run built fresh (a new head): trained in full beside any adapter
        self.fresh_modules: list[str] = []

    def __call__(self, image: Any) -> torch.Tensor:
        Image = _pil()
        image = image.convert("L" if self.channels == 1 else "RGB")
        w, h = image.size
        scale = (self.size / self.crop_pct) / min(w, h)
        rw, rh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((rw, rh), Image.BICUBIC)
        left, top = (rw - self.size) // 2, (rh - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().div_(255)
        pixels = data.view(self.size, self.size, self.channels).permute(2, 0, 1)
        return (pixels - self.mean) / self.std


class _TransformersImageProcessor:
    """A transformers image processor as a one-image function."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.fresh_modules: list[str] = []

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def load_image(value: Any, base_dir: str) -> Any:
    """A PIL image from a file path (relative to the data file's folder), a PIL image, or a
    ``datasets`` image dict (``{"bytes": ..., "path": ...}``)."""
    Image = _pil()
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            import io

            return Image.open(io.BytesIO(value["bytes"]))
        value = value["path"]
    if isinstance(value, str):
        path = value if os.path.isabs(value) or not base_dir else os.path.join(base_dir, value)
        if not os.path.isfile(path):
            raise ConfigError(f"image file {path!r} does not exist")
        with Image.open(path) as img:
            img.load()
            return img
    raise ConfigError(f"cannot read an image from a value of type {type(value).__name__}; give a file path or an image")


def read_image_table(path: str, image_column: str, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """The records of a table (or saved dataset) whose relative image paths are made
    relative to the table's folder."""
    from peftkit.train.data import data_folder, read_records

    records = read_records(path, encoding)
    base = data_folder(path)
    for r in records:
        value = r.get(image_column)
        if isinstance(value, str) and not os.path.isabs(value):
            r[image_column] = os.path.join(base, value)
    return records


@dataclass
class ImageModel(CheckpointModel):
    """Image preprocessing for models without a transformers image processor (plain PyTorch,
    torchvision; timm models bring their own): square size, per-channel mean and std."""

    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    image_channels: int = 3


@dataclass
class ImageData(ClassData):
    image_column: str = "image"


class ImageClassificationTask(Task):
    name = "image_classification"
    model_options = ImageModel
    data_options = ImageData
    task_type = None  # the adapter's task is not needed by any image-model method
    default_metric = "accuracy"
    unit = "images"

    def read(self, path: str, data: DataSection) -> list[dict[str, Any]]:
        records = read_image_folder(path, data.image_column, data.label_column)
        if records is not None:
            return records
        return read_image_table(path, data.image_column, data.encoding)

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        require_column(records, data.image_column, path, "data.image_column")
        require_column(records, data.label_column, path, "data.label_column")

    def labels(self, train: list[dict[str, Any]], validation: list[dict[str, Any]], data: DataSection) -> list[Any]:
        """The classes present, sorted (as integers when all are; sub-folders "5".."9" give
        a 5-way head, not a 10-way one)."""
        def present(values: set[Any]) -> list[Any]:
            labels = infer_labels(values)
            return sorted({int(v) for v in values}) if labels and isinstance(labels[0], int) else labels

        return class_labels(train, validation, data, present)

    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        return load_image_model(cfg, labels)

    def head_modules(self, model: Any, processor: Any) -> list[str]:
        return list(getattr(processor, "fresh_modules", []))

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        column = cfg.data.image_column
        return class_encoder("pixel_values", lambda record: processor(load_image(record[column], "")), cfg.data.label_column, labels)

    def collator(self, cfg: RunConfig, processor: Any) -> Callable[[Sequence[Item]], Batch]:
        def collate(items: Sequence[Item]) -> Batch:
            return add_class_labels({"pixel_values": torch.stack([i["pixel_values"] for i in items])}, items)

        return collate

    def logits(self, model: Any, batch: Batch) -> torch.Tensor:
        return logits_of(call_with_pixels(model, batch["pixel_values"]))

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    def class_probabilities(self, model: Any, batch: Batch) -> torch.Tensor:
        return torch.softmax(self.logits(model, batch).float(), dim=-1)

    def eval_batch(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        logits = self.logits(model, batch)
        n = len(batch["labels"])
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return loss.double(), n, logits.argmax(-1), batch["labels"]

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        value = record.get(cfg.data.image_column)
        return value if isinstance(value, str) else "<image>"

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        for start in range(0, len(records), 32):
            chunk = records[start : start + 32]
            pixels = torch.stack([processor(load_image(r[cfg.data.image_column], "")) for r in chunk])
            with torch.no_grad():
                pred = logits_of(call_with_pixels(model, pixels)).argmax(-1).tolist()
            for record, p in zip(chunk, pred, strict=True):
                yield f"{labels[p] if labels else p}\t{self.describe(record, cfg)}"

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        """``peftkit predict`` reading image paths from standard input."""
        return [{cfg.data.image_column: line} for line in lines]


def takes_keyword(model: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def call_with_pixels(model: Any, pixels: torch.Tensor) -> Any:
    """``model(pixel_values=...)`` for transformers models, ``model(pixels)`` for plain modules
    (pixels in the dtype of the model's weights)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), pixels.dtype)
    pixels = pixels.to(dtype)
    return model(pixel_values=pixels) if takes_keyword(model, "pixel_values") else model(pixels)


# -- the models an image task loads ---------------------------------------------------------
def load_image_model(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
    """An image classifier and its preprocessing (a function from a PIL image to a tensor).

    ``model.name``: a transformers folder or hub id (``AutoModelForImageClassification``,
    with a new head for the run's labels), ``timm:<name>``, ``torchvision:<name>``, or a
    factory ``file.py:function`` / ``module:function`` returning a plain PyTorch module.
    """
    m = cfg.model
    n = len(labels) if labels else None
    name = m.name
    mean, std = m.image_mean, m.image_std
    size = m.image_size
    crop_pct = 1.0
    fresh: list[str] = []
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("timm models need `pip install timm`") from exc
        model = timm.create_model(name[5:], pretrained=m.checkpoint is None, num_classes=n or 1000)
        data_cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = size or int(data_cfg.get("input_size", (3, 224, 224))[-1])
        mean, std = mean or list(data_cfg.get("mean", IMAGENET_MEAN)), std or list(data_cfg.get("std", IMAGENET_STD))
        crop_pct = float(data_cfg.get("crop_pct", 0.875))
        head = data_cfg.get("classifier")
        if n and isinstance(head, str):
            fresh.append(head)
    elif name.startswith("torchvision:"):
        try:
            from torchvision import models as tv_models
        except ImportError as exc:
            raise ConfigError("torchvision models need `pip install torchvision`") from exc
        model = tv_models.get_model(name[12:], weights=None if m.checkpoint else "DEFAULT")
        fresh += _replace_head(model, n)
        size, crop_pct = size or 224, 0.875
    elif is_factory(name):
        model = build_from_factory(name, n)
    else:
        return _transformers_vision(cfg, labels)
    if m.checkpoint:
        fresh = sorted({k.rpartition(".")[0] for k in load_checkpoint(model, m.checkpoint, m.checkpoint_exclude)})
    if size is None:
        raise ConfigError(f"model.image_size is needed for {name!r}: the input size of the model (e.g. 224)")
    channels = m.image_channels
    mean = mean or (list(IMAGENET_MEAN) if channels == 3 else [0.5] * channels)
    std = std or (list(IMAGENET_STD) if channels == 3 else [0.5] * channels)
    processor = ImagePreprocessor(size, mean, std, channels, crop_pct)
    processor.fresh_modules = fresh
    return model, processor


def _replace_head(model: torch.nn.Module, num_labels: int | None) -> list[str]:
    """A new last linear layer with ``num_labels`` outputs (torchvision classifiers); returns
    its name when it was replaced."""
    if num_labels is None:
        return []
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no linear head to replace for {num_labels} classes")
    old = model.get_submodule(last)
    if old.out_features == num_labels:
        return []
    parent, _, child = last.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, torch.nn.Linear(old.in_features, num_labels))
    return [last]


def _transformers_vision(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path, dtype = transformers_source(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
                      label2id={str(v): i for i, v in enumerate(labels)}, ignore_mismatched_sizes=True)
    model = AutoModelForImageClassification.from_pretrained(path, **kwargs)
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint, cfg.model.checkpoint_exclude)
    try:
        processor = _TransformersImageProcessor(AutoImageProcessor.from_pretrained(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path!r} has no image processor (preprocessor_config.json): {exc}") from exc
    if labels and isinstance(getattr(model, "classifier", None), torch.nn.Module):
        processor.fresh_modules = ["classifier"]  # sized for the run's labels
    return model, processor
