"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): CLIP text encoder, KL VAE,
``UNet2DConditionModel`` conditioned on the text encoder's last hidden states, DDPM training
schedule with the epsilon or v-prediction target."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTokenizer

from ..family import ModelFamily, check_pipeline_dir, register, to_device
from ..models import add_lora, cast, set_attention, vae_decode, vae_encode
from ..replay import ddim_sample

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@register
class StableDiffusionFamily(ModelFamily):
    """SD1.5/2.x: latents ``[R, 4, H/8, W/8]`` (the VAE's factor), embeddings ``[R, 77, D]`` (the
    CLIP text model's last hidden states), pooled ``[R, D]`` (its pooled output, which only RPO
    reads: the UNet takes no pooled conditioning)."""

    class_names = ("StableDiffusionPipeline",)

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        device: torch.device,
        weight_dtype: torch.dtype,
    ):
        kind = scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type: expected 'epsilon' or 'v_prediction', got {kind!r}")
        self.tokenizer, self.text_encoder, self.vae, self.scheduler = tokenizer, text_encoder, vae, scheduler
        self.denoiser, self.device, self.weight_dtype = unet, device, weight_dtype

    @classmethod
    def check(cls, path: Path) -> int:
        path = Path(path)
        check_pipeline_dir(path, PIPELINE_SUBFOLDERS, "Stable Diffusion")
        with open(path / "vae" / "config.json") as f:
            return 2 ** (len(json.load(f)["block_out_channels"]) - 1)

    @classmethod
    def default_resolution(cls, path: Path) -> int:
        with open(Path(path) / "vae" / "config.json") as f:
            return int(json.load(f)["sample_size"])

    @classmethod
    def load(cls, path: Path, device: torch.device, weight_dtype: torch.dtype) -> StableDiffusionFamily:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        for frozen in (text_encoder, vae):
            frozen.requires_grad_(False).eval().to(device)
            cast(frozen, weight_dtype)
        return cls(tokenizer, text_encoder, vae, unet.to(device), scheduler, device, weight_dtype)

    def set_attention(self, use_xformers: bool | None) -> str:
        return set_attention(self.denoiser, use_xformers)

    def add_lora(self, rank: int) -> list[torch.nn.Parameter]:
        return add_lora(self.denoiser, rank, self.weight_dtype, LORA_TARGET_MODULES)

    def save_weights(self, reference: str, output_dir: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors``, which ``StableDiffusionPipeline.load_lora_weights``
        reads. Copy: ``unet/`` via ``save_pretrained``."""
        if reference == "lora":
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
            StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=layers, safe_serialization=True)
        else:
            self.denoiser.save_pretrained(Path(output_dir) / "unet", safe_serialization=True)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, size, size

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (), generator=generator)

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            out = self.text_encoder(to_device(ids, self.device))
        return out[0], out[1]

    def encode_images(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        return vae_encode(self.vae, pixels, latent_eps, self.device, self.weight_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents, self.weight_dtype)

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def denoise(
        self,
        model,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return model(noisy, timesteps, embeddings).sample  # no extra conditioning: ``extra`` is [R, 0]

    def sample(
        self,
        predict,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        negative: torch.Tensor,
        negative_pooled: torch.Tensor,
        start: torch.Tensor,
        *,
        num_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        both_pooled = torch.cat([negative_pooled.expand_as(pooled), pooled])  # ddim_sample's [uncond, cond] rows
        return ddim_sample(
            lambda x, t, e: predict(x, t, e, both_pooled),
            self.scheduler.config,
            embeddings,
            negative,
            start,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
        )
