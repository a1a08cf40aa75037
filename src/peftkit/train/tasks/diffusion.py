"""Text-to-image fine-tuning of latent diffusion pipelines (Stable Diffusion 1.x/2.x layout).

``model.name`` is a diffusers pipeline folder with ``unet``, ``vae``, ``text_encoder``,
``tokenizer`` and ``scheduler`` sub-folders. The model that gets the adapter is
:class:`TextToImageModel`: the UNet and the text encoder side by side, whose forward
computes the denoising loss. Targets name modules of either, e.g. ``to_q, to_k, to_v,
to_out.0`` (UNet attention) and, to adapt the text encoder too, ``q_proj, k_proj, v_proj,
out_proj``; whatever has no adapter stays frozen. The VAE is not part of the model:
images are encoded to latent distributions once, when the data is encoded.

Training loss, per example: latents z ~ N(μ, σ²) of the image (times the VAE's scaling
factor), noise ε ~ N(0, I), a timestep t uniform over the noise scheduler's training
steps, z_t = √ᾱ_t·z + √(1-ᾱ_t)·ε (the pipeline's DDPM scheduler); the UNet, conditioned on
the caption's text-encoder states, predicts ε (or the velocity √ᾱ_t·ε - √(1-ᾱ_t)·z for
``v_prediction`` schedulers), and the loss is the mean squared error. Evaluation draws z,
ε and t from a seed derived from each example's caption and pixels, so the validation
loss of one example is comparable between evaluations and runs.

When the adapter is saved, a LoRA adapter is also written as
``pytorch_lora_weights.safetensors`` in the same folder, which diffusers'
``pipeline.load_lora_weights(folder)`` reads.
"""

from __future__ import annotations

import os
import types
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.train.schema import ConfigError, DataSection, ModelSection, RunConfig
from peftkit.train.tasks.base import Batch, Item, Task, require_column
from peftkit.train.tasks.image import ImagePreprocessor, load_image, read_image_folder, read_image_table

__all__ = ["DiffusionProcessor", "TextToImageModel", "TextToImageTask"]

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class TextToImageModel(nn.Module):
    """A UNet and its text encoder; ``forward`` returns the denoising loss of a batch.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        text_encoder: the pipeline's text encoder (e.g. ``CLIPTextModel``).
        noise_scheduler: the pipeline's noise scheduler for training (``DDPMScheduler``).
        name_or_path: the pipeline's folder or hub id.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, noise_scheduler: Any, name_or_path: str | None = None) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(name_or_path=name_or_path)  # recorded in the adapter's config
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"the noise scheduler's prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.num_timesteps = int(noise_scheduler.config.num_train_timesteps)

    def gradient_checkpointing_enable(self, **_: Any) -> None:
        self.unet.enable_gradient_checkpointing()

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden states (no autograd when it has nothing to train)."""
        trains = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            return self.text_encoder(input_ids)[0]

    def draws(self, latent_mean: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(latent noise, diffusion noise, timesteps)``: fresh random draws while training,
        draws fixed by each example's seed in eval mode."""
        if self.training:
            return (torch.randn_like(latent_mean), torch.randn_like(latent_mean),
                    torch.randint(0, self.num_timesteps, (latent_mean.shape[0],), device=latent_mean.device))
        eps, noise, steps = [], [], []
        for seed in seeds.tolist():
            gen = torch.Generator().manual_seed(int(seed))
            eps.append(torch.randn(latent_mean.shape[1:], generator=gen))
            noise.append(torch.randn(latent_mean.shape[1:], generator=gen))
            steps.append(int(torch.randint(0, self.num_timesteps, (1,), generator=gen)))
        to = {"device": latent_mean.device, "dtype": latent_mean.dtype}
        return torch.stack(eps).to(**to), torch.stack(noise).to(**to), torch.tensor(steps, device=latent_mean.device)

    def forward(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, input_ids: torch.Tensor,
                seeds: torch.Tensor) -> Any:
        """Args: the latent distribution of each image (already times the VAE's scaling
        factor), the caption's token ids, and each example's evaluation seed.

        Returns:
            An object with ``loss`` (mean squared error) and ``prediction`` (the UNet's output).
        """
        eps, noise, timesteps = self.draws(latent_mean, seeds)
        latents = latent_mean + latent_std * eps
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        states = self.encode_text(input_ids)
        unet_dtype = next(self.unet.parameters()).dtype
        prediction = self.unet(noisy.to(unet_dtype), timesteps, states.to(unet_dtype)).sample
        loss = F.mse_loss(prediction.float(), target.float())
        return types.SimpleNamespace(loss=loss, prediction=prediction)


class DiffusionProcessor:
    """What turns an image–caption pair into model inputs: the VAE (latents), the tokenizer
    and the image preprocessing (resize, centre crop, scale to [-1, 1])."""

    def __init__(self, vae: nn.Module, tokenizer: Any, image_size: int, device: torch.device) -> None:
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.device = device
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.images = ImagePreprocessor(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of ``(z - shift)·scale`` for one ``(3, H, W)`` image in [-1, 1]."""
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels[None].to(self.device, dtype)).latent_dist
        mean = (dist.mean.float() - self.shift_factor) * self.scaling_factor
        std = dist.std.float() * self.scaling_factor
        return mean[0].cpu(), std[0].cpu()

    def token_ids(self, caption: str) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        out = self.tokenizer(caption, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return out.input_ids[0]


def _seed(caption: str, pixels: torch.Tensor) -> int:
    """A seed fixed by the example's content (its caption and preprocessed pixels)."""
    return zlib.crc32(pixels.numpy().tobytes(), zlib.crc32(caption.encode("utf-8")))


def _check_pipeline_folder(path: str) -> None:
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ConfigError(f"model.name {path!r} is a file; text_to_image needs a diffusers pipeline folder")
        return  # a hub id: diffusers fetches it
    missing = [p for p in PIPELINE_PARTS if not os.path.isdir(os.path.join(path, p))]
    if missing:
        raise ConfigError(
            f"model.name {path!r} is not a diffusers pipeline folder: it lacks {missing}. "
            f"text_to_image needs the StableDiffusionPipeline layout ({', '.join(PIPELINE_PARTS)}), "
            "as written by pipeline.save_pretrained(folder)"
        )


def load_pipeline_parts(path: str, dtype: torch.dtype) -> dict[str, Any]:
    """The UNet, VAE, text encoder, tokenizer and training noise scheduler of a pipeline folder."""
    try:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError as exc:
        raise ConfigError("task text_to_image needs diffusers and transformers: `pip install peftkit[diffusion]`") from exc
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    _check_pipeline_folder(path)
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae"),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
            "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
            # the training scheduler: DDPM with the pipeline's noise schedule (betas, prediction type)
            "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        }
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name {path!r}: the diffusers pipeline could not be loaded: {exc}") from exc


@dataclass
class DiffusionModel(ModelSection):
    """``name``: a diffusers pipeline folder; ``image_size``: training resolution (default: the
    UNet's sample size times the VAE's scale)."""

    image_size: int | None = None


@dataclass
class DiffusionData(DataSection):
    image_column: str = "image"
    caption_column: str = "caption"


class TextToImageTask(Task):
    """LoRA (or another method) on the UNet, optionally the text encoder, of a diffusion pipeline."""

    name = "text_to_image"
    model_options = DiffusionModel
    data_options = DiffusionData
    task_type = None
    default_metric = "eval_loss"
    unit = "images"

    # -- data ---------------------------------------------------------------------------
    def read(self, path: str, data: DataSection) -> list[dict[str, Any]]:
        """A table of image paths and captions, or an image folder whose sub-folder names
        (underscores as spaces) are the captions."""
        records = read_image_folder(path, data.image_column, data.caption_column)
        if records is not None:
            for r in records:
                r[data.caption_column] = r[data.caption_column].replace("_", " ")
            return records
        return read_image_table(path, data.image_column, data.encoding)

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        require_column(records, data.image_column, path, "data.image_column")
        require_column(records, data.caption_column, path, "data.caption_column")
        for i, r in enumerate(records):
            caption = r.get(data.caption_column)
            if not isinstance(caption, str):
                raise ConfigError(f"{path}: record {i} has a {type(caption).__name__} caption ({data.caption_column!r}); captions must be text")

    # -- model --------------------------------------------------------------------------
    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        dtype = getattr(torch, cfg.model.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"model.dtype {cfg.model.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        parts = load_pipeline_parts(cfg.model.name, dtype)
        vae_scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
        size = cfg.model.image_size or int(parts["unet"].config.sample_size) * vae_scale
        if size % vae_scale:
            raise ConfigError(f"model.image_size={size} must be a multiple of the VAE's downscaling factor {vae_scale}")
        model = TextToImageModel(parts["unet"], parts["text_encoder"], parts["scheduler"], cfg.model.name)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return model, DiffusionProcessor(parts["vae"], parts["tokenizer"], size, device)

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        image_column, caption_column = cfg.data.image_column, cfg.data.caption_column

        def encode(record: dict[str, Any]) -> Item:
            pixels = processor.images(load_image(record[image_column], ""))
            caption = str(record.get(caption_column) or "")
            mean, std = processor.latent_distribution(pixels)
            return {"latent_mean": mean, "latent_std": std, "input_ids": processor.token_ids(caption),
                    "seed": _seed(caption, pixels)}

        return encode

    def collator(self, cfg: RunConfig, processor: Any) -> Callable[[Sequence[Item]], Batch]:
        def collate(items: Sequence[Item]) -> Batch:
            return {
                "latent_mean": torch.stack([i["latent_mean"] for i in items]),
                "latent_std": torch.stack([i["latent_std"] for i in items]),
                "input_ids": torch.stack([i["input_ids"] for i in items]),
                "seeds": torch.tensor([i["seed"] for i in items], dtype=torch.long),
            }

        return collate

    def units(self, batch: Batch) -> int:
        return int(batch["latent_mean"].shape[0])

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        return str(record.get(cfg.data.caption_column, ""))

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        return [{cfg.data.caption_column: line} for line in lines]

    # -- files --------------------------------------------------------------------------
    def after_save(self, model: Any, directory: str, cfg: RunConfig) -> None:
        """Writes the LoRA adapter of the UNet (and text encoder) as diffusers'
        ``pytorch_lora_weights.safetensors`` and as a kohya / A1111 file, ``lora.safetensors``
        (AUTOMATIC1111, ComfyUI), beside peftkit's adapter files."""
        from peftkit.integrations.diffusers import DiffusersLoraError, save_lora_weights
        from peftkit.integrations.kohya import save_kohya_lora_weights
        from peftkit.methods.lora.layer import LoraLayer

        base = model.get_base_model()
        parts = {part: getattr(base, part) for part in ("unet", "text_encoder")
                 if any(isinstance(m, LoraLayer) for m in getattr(base, part).modules())}
        if not parts:
            return  # only LoRA layers have a diffusers file format
        config = next(iter(model.peft_config.values()))
        try:
            if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
                raise DiffusersLoraError("bias or modules_to_save were trained; a diffusers LoRA file holds LoRA factors only")
            save_lora_weights(directory, **parts, adapter_name=next(iter(model.peft_config)))
            save_kohya_lora_weights(directory, **parts, adapter_name=next(iter(model.peft_config)))
        except DiffusersLoraError as exc:
            warnings.warn(f"no diffusers LoRA file written to {directory}: {exc}", stacklevel=2)
