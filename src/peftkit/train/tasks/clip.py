"""Contrastive image-text fine-tuning of CLIP-style dual encoders (``CLIPModel`` and models
with the same interface), with zero-shot classification as the evaluation.

Data: a table (CSV/JSONL/Parquet or a saved ``datasets`` dataset) of images
(``data.image_column``: a file path relative to the table, or an image) and captions
(``data.caption_column``), optionally with class labels (``data.label_column``) for
zero-shot evaluation; or an image folder with one sub-folder per class. A record without a
caption gets one from ``data.caption_template`` over its label ("a photo of a {label}.");
the same template over the run's label names makes the class prompts of zero-shot
evaluation and ``peftkit predict``.

Loss: the symmetric contrastive (InfoNCE) loss over the batch, with the model's learned
logit scale. Identical captions in a batch (always the case with templated captions) are
embedded once and are one target: an image's positive is its caption; a caption's
positives are all the images it describes, and its loss is the negative log of the
probability mass on them. Without duplicates this is CLIP's loss exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.train.schema import ConfigError, DataSection, RunConfig
from peftkit.train.tasks.base import (
    Batch,
    CheckpointModel,
    Item,
    LabelIds,
    Task,
    classification_metrics,
    infer_labels,
    require_column,
    to_device,
)
from peftkit.train.tasks.image import ImageClassificationTask, load_image
from peftkit.train.tasks.text import TextModel

__all__ = ["ClipCollator", "ClipProcessor", "ClipTask", "contrastive_loss", "load_clip_model"]

# reads image folders and tables exactly as image classification does (relative paths too)
_IMAGE_READER = ImageClassificationTask()


def contrastive_loss(logits_per_image: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over ``B`` images and ``T`` distinct captions.

    ``L = ½·(mean_i −log softmax_t(s)[i, c(i)] + mean_t −log Σ_{i: c(i)=t} softmax_i(sᵀ)[t, i])``
    where ``s = exp(logit_scale)·cos(image, caption)`` and ``c(i)`` is the caption of image i.

    Args:
        logits_per_image: ``(B, T)`` scaled similarities.
        caption_ids: ``(B,)`` the column of each image's caption; every column is used.
    """
    logits = logits_per_image.float()
    image_side = F.cross_entropy(logits, caption_ids)
    positives = caption_ids.unsqueeze(0) == torch.arange(logits.shape[1], device=logits.device).unsqueeze(1)
    per_text = logits.t()
    text_side = (torch.logsumexp(per_text, 1) - torch.logsumexp(per_text.masked_fill(~positives, float("-inf")), 1)).mean()
    return (image_side + text_side) / 2


def _label_text(label: Any) -> str:
    return str(label).replace("_", " ")  # folder names such as "golden_retriever"


def _features(output: Any) -> torch.Tensor:
    """Projected features from ``get_text_features``/``get_image_features`` (a tensor in
    older transformers, an output object with ``pooler_output`` in newer ones)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_embeddings(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return F.normalize(_features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float(), dim=-1)


def image_embeddings(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    pixels = pixel_values.to(_model_dtype(model))
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


def _model_dtype(model: Any) -> torch.dtype:
    """The dtype of the model's weights (pixels are cast to it: a bfloat16 model takes
    bfloat16 images)."""
    dtype = getattr(getattr(model, "module", model), "dtype", None)  # DDP keeps the model in .module
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _forward(model: Any, batch: Batch) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"].to(_model_dtype(model)))


class ClipProcessor:
    """The run's tokenizer and image processor, plus the class prompts of its labels."""

    def __init__(self, tokenizer: Any, image_processor: Any, max_length: int, labels: list[Any] | None, template: str) -> None:
        self.tokenizer, self.image_processor, self.max_length = tokenizer, image_processor, max_length
        self.labels, self.template = labels, template
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    def image(self, image: Any) -> torch.Tensor:
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])

    def caption(self, label: Any) -> str:
        return self.template.format(label=_label_text(label))

    def pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask

    def class_prompts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token ids and mask of one prompt per class, or None without labels."""
        if not self.labels:
            return None
        return self.pad([self.tokens(self.caption(label)) for label in self.labels])

    def save_pretrained(self, path: str) -> None:
        """Writes the tokenizer and image processor (beside a merged model)."""
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def load_clip_model(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, ClipProcessor]:
    """A CLIP-style dual encoder (``AutoModel``) from ``model.name`` with its tokenizer and
    image processor."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from peftkit.train.modeling import load_checkpoint, transformers_source

    path, dtype = transformers_source(cfg)
    model = AutoModel.from_pretrained(path, dtype=dtype)
    missing = [a for a in ("get_text_features", "get_image_features", "logit_scale") if not hasattr(model, a)]
    if missing:
        raise ConfigError(f"task clip needs a CLIP-style image-text model (e.g. CLIPModel); {type(model).__name__} "
                          f"from {path!r} has no {', '.join(missing)}")
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path!r} needs a tokenizer and an image processor (save the model's CLIPProcessor there): {exc}") from exc
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    max_length = min(cfg.model.max_length, positions) if positions else cfg.model.max_length
    return model, ClipProcessor(tokenizer, image_processor, max_length, labels, cfg.data.caption_template)


class ClipCollator:
    """Stacks images; pads each distinct caption of the batch once (``caption_ids`` maps
    images to them)."""

    def __init__(self, processor: ClipProcessor) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[Item]) -> Batch:
        columns: dict[tuple[int, ...], int] = {}
        caption_ids = [columns.setdefault(tuple(i["input_ids"]), len(columns)) for i in items]
        ids, mask = self.processor.pad(list(columns))
        batch: Batch = {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "input_ids": ids,
                        "attention_mask": mask, "caption_ids": torch.tensor(caption_ids, dtype=torch.long)}
        if all("labels" in i for i in items):
            batch["labels"] = torch.tensor([i["labels"] for i in items], dtype=torch.long)
        return batch


@dataclass
class ClipModel(TextModel, CheckpointModel):
    """A checkpoint to load, and ``max_length``: captions are cut to this many tokens (and to
    the model's positions)."""


@dataclass
class ClipData(DataSection):
    """Records hold an image and a caption, or a label that ``caption_template`` turns into
    one (also the zero-shot class prompt)."""

    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str = "label"
    caption_template: str = "a photo of a {label}."


class ClipTask(Task):
    name = "clip"
    model_options = ClipModel
    data_options = ClipData
    task_type = None  # Hugging Face PEFT has no task type for dual encoders
    default_metric = "accuracy"  # zero-shot accuracy; eval_loss for data without labels
    unit = "images"

    # -- data ---------------------------------------------------------------------------
    def read(self, path: str, data: DataSection) -> list[dict[str, Any]]:
        return _IMAGE_READER.read(path, data)

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        if "{label}" not in data.caption_template:
            raise ConfigError(f"data.caption_template {data.caption_template!r} must contain {{label}}, e.g. 'a photo of a {{label}}.'")
        require_column(records, data.image_column, path, "data.image_column")
        for number, record in enumerate(records, 1):
            if record.get(data.image_column) is None:
                raise ConfigError(f"{path}: record {number} has no image ({data.image_column!r}, data.image_column)")
            if not _has_caption(record, data) and record.get(data.label_column) is None:
                raise ConfigError(
                    f"{path}: record {number} has neither a caption ({data.caption_column!r}, data.caption_column) nor a "
                    f"label ({data.label_column!r}, data.label_column) to make one from data.caption_template; "
                    f"its columns are {sorted(record)}")

    def labels(self, train: list[dict[str, Any]], validation: list[dict[str, Any]], data: DataSection) -> list[Any] | None:
        records = train + validation
        labelled = sum(record.get(data.label_column) is not None for record in records)
        if labelled == 0:
            return None
        if labelled < len(records):
            where = "validation" if all(r.get(data.label_column) is not None for r in train) else "training"
            raise ConfigError(f"some {where} records have no {data.label_column!r} (data.label_column): give every record "
                              f"a label for zero-shot evaluation, or none")
        return infer_labels({r[data.label_column] for r in records})

    def metric_for(self, labels: list[Any] | None) -> str:
        return "accuracy" if labels else "eval_loss"

    # -- model --------------------------------------------------------------------------
    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        return load_clip_model(cfg, labels)

    def encoder(self, cfg: RunConfig, processor: ClipProcessor, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        label_id = LabelIds(labels)
        data = cfg.data

        def encode(record: dict[str, Any]) -> Item:
            label = record.get(data.label_column)
            caption = str(record[data.caption_column]) if _has_caption(record, data) else processor.caption(label)
            item: Item = {"pixel_values": processor.image(load_image(record[data.image_column], "")),
                          "input_ids": processor.tokens(caption)}
            if labels and label is not None:
                item["labels"] = label_id(label)
            return item

        return encode

    def collator(self, cfg: RunConfig, processor: ClipProcessor) -> ClipCollator:
        return ClipCollator(processor)

    def units(self, batch: Batch) -> int:
        return int(batch["pixel_values"].shape[0])

    # -- training and evaluation ----------------------------------------------------------
    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        out = _forward(model, batch)
        return contrastive_loss(out.logits_per_image, batch["caption_ids"])

    @torch.no_grad()
    def evaluate(self, model: Any, items: list[Item], collate: Callable[[Sequence[Item]], Batch],
                 batch_size: int, accelerator: Any = None) -> dict[str, float]:
        """``eval_loss`` (the contrastive loss of batches of ``batch_size``), zero-shot
        ``accuracy``/``f1`` over the class prompts when the items have labels, and
        recall@1 of image->caption and caption->image retrieval over the whole set
        (identical captions count as one)."""
        from peftkit.train.tasks.base import _device_of

        processor = getattr(collate, "processor", None)
        if not isinstance(processor, ClipProcessor):
            raise TypeError("ClipTask.evaluate needs the run's ClipCollator (Prepared.collate)")
        was_training = model.training
        model.eval()
        world = accelerator.num_processes if accelerator else 1
        rank = accelerator.process_index if accelerator else 0
        device = accelerator.device if accelerator else _device_of(model)
        distinct: dict[tuple[int, ...], int] = {}
        caption_of = [distinct.setdefault(tuple(i["input_ids"]), len(distinct)) for i in items]
        zero_shot = processor.labels is not None and bool(items) and all("labels" in i for i in items)
        order = list(range(len(items)))[rank::world]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        images, captions, golds = [], [], []
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = to_device(collate([items[i] for i in chunk]), device)
            out = _forward(model, batch)
            loss_sum += contrastive_loss(out.logits_per_image, batch["caption_ids"]).double() * len(chunk)
            count += len(chunk)
            images.append(F.normalize(out.image_embeds.float(), dim=-1))
            captions.append(torch.tensor([caption_of[i] for i in chunk], dtype=torch.long, device=device))
            if zero_shot:
                golds.append(batch["labels"])
        if accelerator is not None and world > 1:
            loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
        result = {"eval_loss": float(loss_sum / count.clamp(min=1))}
        if items:
            texts = _embed_texts(model, *processor.pad(list(distinct)), batch_size, device)
            empty_long = torch.zeros(0, dtype=torch.long, device=device)
            image_emb = _gather_rows(accelerator, torch.cat(images) if images else texts.new_zeros(0, texts.shape[1]))
            caption_ids = _gather_rows(accelerator, torch.cat(captions) if captions else empty_long)
            if zero_shot:
                prompts = processor.class_prompts()
                assert prompts is not None
                classes = _embed_texts(model, *prompts, batch_size, device)
                gold = _gather_rows(accelerator, torch.cat(golds) if golds else empty_long)
                result.update(classification_metrics((image_emb @ classes.t()).argmax(-1).cpu(), gold.cpu()))
            sims = image_emb @ texts.t()
            result["i2t_recall@1"] = float((sims.argmax(1) == caption_ids).float().mean())
            present = torch.unique(caption_ids)
            result["t2i_recall@1"] = float((caption_ids[sims[:, present].argmax(0)] == present).float().mean())
        model.train(was_training)
        return result

    # -- prediction -------------------------------------------------------------------------
    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        return _IMAGE_READER.describe(record, cfg)

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        return _IMAGE_READER.read_inputs(lines, cfg)

    @torch.no_grad()
    def predict(self, model: Any, processor: ClipProcessor, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        """``label<TAB>image`` by zero-shot classification over the run's labels."""
        prompts = processor.class_prompts()
        if prompts is None:
            raise ConfigError("zero-shot prediction needs the run's class labels; this run was trained without "
                              f"data.label_column ({cfg.data.label_column!r}) or an image folder of classes")
        device = next(model.parameters()).device
        classes = _embed_texts(model, *prompts, cfg.train.eval_batch_size, device)
        for start in range(0, len(records), 32):
            chunk = records[start : start + 32]
            pixels = torch.stack([processor.image(load_image(r[cfg.data.image_column], "")) for r in chunk]).to(device)
            pred = (image_embeddings(model, pixels) @ classes.t()).argmax(-1).tolist()
            for record, p in zip(chunk, pred, strict=True):
                yield f"{processor.labels[p]}\t{self.describe(record, cfg)}"


def _has_caption(record: dict[str, Any], data: DataSection) -> bool:
    value = record.get(data.caption_column)
    return value is not None and str(value).strip() != ""


def _embed_texts(model: Any, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, device: Any) -> torch.Tensor:
    parts = [text_embeddings(model, ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device))
             for s in range(0, len(ids), batch_size)]
    return torch.cat(parts)


def _gather_rows(accelerator: Any, rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process, concatenated (shards may differ in length)."""
    if accelerator is None or accelerator.num_processes == 1:
        return rows
    counts = accelerator.gather(torch.tensor([rows.shape[0]], device=rows.device)).tolist()
    padded = accelerator.pad_across_processes(rows, dim=0)
    gathered = accelerator.gather(padded).view(len(counts), -1, *rows.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])
