"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders, KL VAE,
``UNet2DConditionModel`` with ``text_time`` added conditioning, DDPM training schedule with the
epsilon or v-prediction target.

Conditioning as diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py``
builds it (read at huggingface/diffusers 58eb52c0803ea9af3abec60841c2a093bdf1f951): the prompt
embeddings are both encoders' penultimate hidden states concatenated along the width, the pooled
embeddings text_encoder_2's projected ``text_embeds``, and each pair's six time ids are
``original_size + crop_top_left + (resolution, resolution)``: the winner image's decoded
``(height, width)``, then the top-left ``(y, x)`` of the crop taken after the shorter-side resize
and the horizontal flip (both images of a pair share resize, flip and crop).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..family import ModelFamily, check_pipeline_dir, register, to_device
from ..models import add_lora, cast, set_attention, vae_decode, vae_encode
from ..replay import ddim_sample

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers SDXL DPO script's
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
NUM_TIME_IDS = 6
PIPELINE_SIZE_MULTIPLE = 8  # StableDiffusionXLPipeline.check_inputs: height and width divisible by 8


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(height, width)`` after torchvision's ``Resize(resolution)`` (the DPO script's resize):
    the shorter side becomes ``resolution``, the longer ``int(resolution * long / short)``."""
    if width <= height:
        return int(resolution * height / width), resolution
    return resolution, int(resolution * width / height)


def crop_and_flip(
    images: list[torch.Tensor],
    resolution: int,
    *,
    random_crop: bool,
    hflip: bool,
    generator: torch.Generator,
    reference: int = 0,
) -> tuple[list[torch.Tensor], tuple[int, int, int, int, int, int]]:
    """The DPO script's per-pair transform on decoded ``[3, h, w]`` float images: every image
    resized to image ``reference``'s size (the pair's ``jpg_0``), then all resized (shorter side
    to ``resolution``), flipped horizontally with probability 1/2 when ``hflip``, and cropped to
    ``resolution`` square (the centre, rounded, or a uniform random top-left), alike. Returns the
    ``[3, resolution, resolution]`` crops in the order given and the time ids ``(original_h,
    original_w, top, left, resolution, resolution)``: original = image ``reference``'s size,
    top-left in the flipped image's coordinates. Two draws from ``generator`` per call (flip,
    then crop), whatever the flags."""
    original = tuple(images[reference].shape[-2:])
    height, width = resized_size(*original, resolution)
    stacked = []
    for image in images:
        if tuple(image.shape[-2:]) != original:  # the script brings the other images to the first's size
            image = F.interpolate(image[None], size=original, mode="bilinear", antialias=True, align_corners=False)[0]
        stacked.append(image)
    pixels = torch.stack(stacked)
    if (height, width) != original:
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    flip = bool(torch.rand((), generator=generator) < 0.5)  # host-ok: CPU generator, data loading
    offsets = torch.randint(0, 2**31 - 1, (2,), generator=generator)
    if hflip and flip:
        pixels = pixels.flip(-1)
    if random_crop:
        top = int(offsets[0]) % (height - resolution + 1)  # host-ok: CPU generator, data loading
        left = int(offsets[1]) % (width - resolution + 1)  # host-ok: CPU generator, data loading
    else:
        top = max(0, int(round((height - resolution) / 2.0)))
        left = max(0, int(round((width - resolution) / 2.0)))
    crops = pixels[:, :, top : top + resolution, left : left + resolution]
    return list(crops), (*original, top, left, resolution, resolution)


@register
class StableDiffusionXLFamily(ModelFamily):
    """SDXL: latents ``[R, 4, H/f, W/f]`` (``f`` the VAE's factor, 8 for SDXL), embeddings
    ``[R, 77, D1 + D2]`` (both encoders' penultimate hidden states; 768 + 1280 = 2048 for SDXL),
    pooled ``[R, P]`` (text_encoder_2's ``text_embeds``, 1280), extra ``[R, 6]`` float32 time ids.
    """

    class_names = ("StableDiffusionXLPipeline",)

    def __init__(
        self,
        tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
        text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        device: torch.device,
        weight_dtype: torch.dtype,
        *,
        force_zeros_for_empty_prompt: bool = True,
    ):
        kind = scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type: expected 'epsilon' or 'v_prediction', got {kind!r}")
        self.tokenizers, self.text_encoders, self.vae, self.scheduler = tokenizers, text_encoders, vae, scheduler
        self.denoiser, self.device, self.weight_dtype = unet, device, weight_dtype
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def check(cls, path: Path) -> int:
        path = Path(path)
        check_pipeline_dir(path, PIPELINE_SUBFOLDERS, "Stable Diffusion XL")
        with open(path / "unet" / "config.json") as f:
            embed = json.load(f).get("addition_embed_type")
        if embed != "text_time":
            raise ValueError(
                f"--pretrained_model_name_or_path: {str(path / 'unet' / 'config.json')!r} must have "
                f"addition_embed_type 'text_time' (SDXL's pooled-text and time-id conditioning), got {embed!r}"
            )
        with open(path / "vae" / "config.json") as f:
            return 2 ** (len(json.load(f)["block_out_channels"]) - 1)

    @classmethod
    def default_resolution(cls, path: Path) -> int:
        """The UNet's ``sample_size`` times the VAE factor, the pipeline's default image size
        (1024 for SDXL)."""
        path = Path(path)
        with open(path / "unet" / "config.json") as f:
            sample_size = int(json.load(f)["sample_size"])
        with open(path / "vae" / "config.json") as f:
            return sample_size * 2 ** (len(json.load(f)["block_out_channels"]) - 1)

    @classmethod
    def check_resolution(cls, path: Path, resolution: int) -> None:
        """Refuse a ``resolution`` that is not a multiple of 8: ``StableDiffusionXLPipeline`` samples
        only such sizes (its ``check_inputs``), so the time ids' target size could never be used."""
        if resolution % PIPELINE_SIZE_MULTIPLE:
            raise ValueError(
                f"--resolution: StableDiffusionXLPipeline takes image sizes that are multiples of "
                f"{PIPELINE_SIZE_MULTIPLE} (the target size of the time ids), got {resolution}"
            )

    @classmethod
    def load(cls, path: Path, device: torch.device, weight_dtype: torch.dtype) -> StableDiffusionXLFamily:
        tokenizers = tuple(CLIPTokenizer.from_pretrained(path, subfolder=s) for s in ("tokenizer", "tokenizer_2"))
        text_encoders = (
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
        )
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        for frozen in (*text_encoders, vae):
            frozen.requires_grad_(False).eval().to(device)
            cast(frozen, weight_dtype)
        index = json.loads((Path(path) / "model_index.json").read_text())
        return cls(
            tokenizers,
            text_encoders,
            vae,
            unet.to(device),
            scheduler,
            device,
            weight_dtype,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )

    def set_attention(self, use_xformers: bool | None) -> str:
        return set_attention(self.denoiser, use_xformers)

    def add_lora(self, rank: int) -> list[torch.nn.Parameter]:
        return add_lora(self.denoiser, rank, self.weight_dtype, LORA_TARGET_MODULES)

    def save_weights(self, reference: str, output_dir: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors``, which ``StableDiffusionXLPipeline.
        load_lora_weights`` reads. Copy: ``unet/`` via ``save_pretrained``."""
        if reference == "lora":
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
            StableDiffusionXLPipeline.save_lora_weights(output_dir, unet_lora_layers=layers, safe_serialization=True)
        else:
            self.denoiser.save_pretrained(Path(output_dir) / "unet", safe_serialization=True)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, size, size

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (), generator=generator)

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [N, L, D1 + D2], pooled [N, P])``: each encoder's ``hidden_states[-2]``
        (its input padded to the tokenizer's ``model_max_length``) concatenated, and
        text_encoder_2's ``text_embeds``."""
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            with torch.no_grad():
                out = encoder(to_device(ids, self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: text_encoder_2's projected text_embeds
        return torch.cat(states, dim=-1), pooled

    def prepare_images(
        self,
        images: list[bytes],
        resolution: int,
        *,
        random_crop: bool,
        hflip: bool,
        generator: torch.Generator,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``crop_and_flip`` of the decoded images; extra = the six time ids ``[6]`` float32. The
        original size is the pair's ``jpg_0`` image's (the winner or the loser), as in the DPO
        script; a single image's own."""
        from ..data import decode_image  # here: the data libraries load with the data

        columns = [getattr(data, "column", "") for data in images]  # a pair comes winner first
        pixels, time_ids = crop_and_flip(
            [decode_image(data) for data in images],
            resolution,
            random_crop=random_crop,
            hflip=hflip,
            generator=generator,
            reference=columns.index("jpg_0") if "jpg_0" in columns else 0,
        )
        return pixels, torch.tensor(time_ids, dtype=torch.float32)

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

    def default_time_ids(self, noisy: torch.Tensor) -> torch.Tensor:
        """``[R, 6]`` float32 time ids of uncropped images of the latents' pixel size, ``(H, W,
        0, 0, H, W)``: the pipeline's defaults, for rows without extra conditioning."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        height, width = (s * factor for s in noisy.shape[-2:])
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=noisy.device)
        return ids.expand(noisy.shape[0], NUM_TIME_IDS)

    def denoise(
        self,
        model,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet with ``added_cond_kwargs={"text_embeds": pooled, "time_ids": extra}``, the time
        ids in the embeddings' dtype (the weight dtype, as the DPO script and the pipeline cast
        them); ``extra`` None or ``[R, 0]``: ``default_time_ids``."""
        if extra is None or extra.shape[-1] == 0:  # shapes, not values: no host synchronisation
            extra = self.default_time_ids(noisy)
        conditioning = {"text_embeds": pooled, "time_ids": extra.to(embeddings.dtype)}
        return model(noisy, timesteps, embeddings, added_cond_kwargs=conditioning).sample

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
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM with classifier-free guidance as the pipeline runs it: the unconditional rows
        are zero embeddings when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL's
        default) and ``negative`` / ``negative_pooled`` otherwise, and both halves get the rows'
        time ids ``extra [B, 6]`` (``default_time_ids`` when None)."""
        if self.force_zeros_for_empty_prompt:
            negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
        if extra is None:
            extra = self.default_time_ids(start)
        both_pooled = torch.cat([negative_pooled.expand_as(pooled), pooled])  # ddim_sample's [uncond, cond] rows
        both_extra = torch.cat([extra, extra])
        return ddim_sample(
            lambda x, t, e: predict(x, t, e, both_pooled, both_extra),
            self.scheduler.config,
            embeddings,
            negative,
            start,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
        )
