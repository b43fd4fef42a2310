"""Flux (``FluxPipeline``): ``FluxTransformer2DModel`` trained with flow matching
(``fastpref.training.flow``) on 2x2-packed latents, conditioned as the pipeline conditions it: the
T5 encoder's last hidden states as the text tokens (``txt_ids`` zeros), CLIP's pooled output as the
pooled projections, the image tokens' ``(0, row, column)`` ids, the timestep as ``t / 1000`` and,
when the transformer has ``guidance_embeds``, a guidance input.

Read at huggingface/diffusers (v0.42 site-packages ``pipelines/flux/pipeline_flux.py`` and
``examples/dreambooth/train_dreambooth_lora_flux.py``): the packing, unpacking and image ids are
``FluxPipeline``'s own static methods (called, not re-written); the guidance value is the script's
``--guidance_scale`` default, 3.5 (``GUIDANCE_SCALE``); the LoRA targets are the script's default
``--lora_layers``. ``Batch`` latents stay unpacked ``[R, C, h, w]``: ``denoise`` packs and unpacks,
so noising, targets and losses are the shared flow ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTokenizer

from ..family import check_pipeline_dir, register, to_device
from ..flow import FlowMatchingFamily
from ..models import add_lora, cast, set_attention, vae_decode, vae_encode

# train_dreambooth_lora_flux.py's default --lora_layers: attention (image and text streams) and feed-forwards
LORA_TARGET_MODULES = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
PIPELINE_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's and the LoRA script's default T5 length (and its maximum)
GUIDANCE_SCALE = 3.5  # the LoRA script's --guidance_scale default, fed when the transformer has guidance_embeds
TIMESTEP_SCALE = 1000.0  # the transformer takes t / 1000 (the pipeline's and the script's call)


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _vae_factor(path: Path) -> int:
    return 2 ** (len(_read_json(Path(path) / "vae" / "config.json")["block_out_channels"]) - 1)


@register
class FluxFamily(FlowMatchingFamily):
    """Flux: latents ``[R, C, h, w]`` unpacked (C = the VAE's latent channels, 16 for Flux; the
    transformer sees ``[R, (h/2)(w/2), 4C]``), embeddings ``[R, L, D_t5]`` (T5's last hidden
    states at ``max_sequence_length`` L, 512 for a real Flux, ``D_t5 = joint_attention_dim``),
    pooled ``[R, P]`` (CLIP's ``pooler_output``, ``P = pooled_projection_dim``)."""

    class_names = ("FluxPipeline",)

    def __init__(
        self,
        tokenizers: tuple[CLIPTokenizer, object],
        text_encoders: tuple[CLIPTextModel, torch.nn.Module],
        vae: AutoencoderKL,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        device: torch.device,
        weight_dtype: torch.dtype,
    ):
        """``tokenizers`` / ``text_encoders``: (CLIP, T5) as the pipeline's ``tokenizer`` /
        ``tokenizer_2`` and ``text_encoder`` / ``text_encoder_2``."""
        self.tokenizers, self.text_encoders, self.vae, self.scheduler = tokenizers, text_encoders, vae, scheduler
        self.denoiser, self.device, self.weight_dtype = transformer, device, weight_dtype

    # --- before loading ---

    @classmethod
    def check(cls, path: Path) -> int:
        path = Path(path)
        check_pipeline_dir(path, PIPELINE_SUBFOLDERS, "FluxPipeline")
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json").get("_class_name")
        if scheduler != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"--pretrained_model_name_or_path: expected scheduler FlowMatchEulerDiscreteScheduler in "
                f"{str(path / 'scheduler')!r}, got {scheduler!r}"
            )
        return _vae_factor(path)

    @classmethod
    def default_resolution(cls, path: Path) -> int:
        """FluxPipeline's default image size: ``default_sample_size`` 128 times the VAE factor, or
        the transformer's ``sample_size`` when its config names one (the tiny pipeline does not;
        then 128 x factor as the pipeline)."""
        path = Path(path)
        sample_size = _read_json(path / "transformer" / "config.json").get("sample_size", 128)
        return int(sample_size) * _vae_factor(path)

    @classmethod
    def check_resolution(cls, path: Path, resolution: int) -> None:
        """The latent side ``resolution / factor`` must be a whole even number: the transformer takes
        2x2 packed latents (``FluxPipeline._pack_latents``)."""
        factor = _vae_factor(path)
        if resolution % (2 * factor):
            raise ValueError(
                f"--resolution: Flux packs the latent in 2x2 patches, expected a multiple of {2 * factor} "
                f"(VAE factor {factor} x 2, an even latent side), got {resolution}"
            )

    @classmethod
    def load(cls, path: Path, device: torch.device, weight_dtype: torch.dtype) -> FluxFamily:
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizers = (
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
        )
        encoders = (
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2"),
        )
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        for frozen in (*encoders, vae):
            frozen.requires_grad_(False).eval().to(device)
            cast(frozen, weight_dtype)
        return cls(tokenizers, encoders, vae, transformer.to(device), scheduler, device, weight_dtype)

    # --- the trainable denoiser ---

    def set_attention(self, use_xformers: bool | None) -> str:
        return set_attention(self.denoiser, use_xformers, FluxAttnProcessor())

    def add_lora(self, rank: int) -> list[torch.nn.Parameter]:
        return add_lora(self.denoiser, rank, self.weight_dtype, LORA_TARGET_MODULES)

    def save_weights(self, reference: str, output_dir: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` as the Flux LoRA script writes it
        (``FluxPipeline.load_lora_weights`` reads it). Copy: ``transformer/`` via ``save_pretrained``."""
        if reference == "lora":
            FluxPipeline.save_lora_weights(
                output_dir, transformer_lora_layers=get_peft_model_state_dict(self.denoiser), safe_serialization=True
            )
        else:
            self.denoiser.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)

    # --- data ---

    @property
    def max_sequence_length(self) -> int:
        """The T5 length: ``MAX_SEQUENCE_LENGTH`` (512, the pipeline's default), or the T5
        tokenizer's ``model_max_length`` when shorter (the tiny pipeline's 8; the sampler passes the
        same to the pipeline, ``fastpref.pairs.sampling.sequence_length_kwargs``)."""
        return min(MAX_SEQUENCE_LENGTH, int(self.tokenizers[1].model_max_length))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // self.vae_factor
        return self.vae.config.latent_channels, size, size

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``N`` captions -> ``(embeddings [N, L, D_t5], pooled [N, P])`` as
        ``FluxPipeline.encode_prompt``: T5's last hidden states at ``L = self.max_sequence_length``
        (512 for a real Flux), CLIP's ``pooler_output`` at the CLIP tokenizer's ``model_max_length``."""
        (clip_tok, t5_tok), (clip, t5) = self.tokenizers, self.text_encoders
        with torch.no_grad():
            ids = clip_tok(
                captions,
                padding="max_length",
                max_length=clip_tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            pooled = clip(to_device(ids, self.device), output_hidden_states=False).pooler_output
            ids = t5_tok(
                captions,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeddings = t5(to_device(ids, self.device), output_hidden_states=False)[0]
        return embeddings.to(pooled.dtype), pooled

    def encode_images(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        """``(z - shift_factor) · scaling_factor`` of the VAE posterior sample ``z`` (the Flux script's)."""
        return vae_encode(self.vae, pixels, latent_eps, self.device, self.weight_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents, self.weight_dtype)

    # --- the step ---

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[R, C, h, w]`` -> ``[R, (h/2)(w/2), 4C]`` (``FluxPipeline._pack_latents``)."""
        rows, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents.contiguous(), rows, channels, height, width)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[R, (h/2)(w/2), 4C]`` -> ``[R, C, h, w]`` for a latent of side ``h x w``
        (``FluxPipeline._unpack_latents`` at pixel size ``h·f x w·f``)."""
        factor = self.vae_factor
        return FluxPipeline._unpack_latents(tokens, height * factor, width * factor, factor)

    def image_ids(self, height: int, width: int, device, dtype) -> torch.Tensor:
        """``[(h/2)(w/2), 3]`` ids ``(0, row, column)`` of the packed tokens of an ``h x w`` latent
        (``FluxPipeline._prepare_latent_image_ids``)."""
        return FluxPipeline._prepare_latent_image_ids(None, height // 2, width // 2, device, dtype)

    def denoise(
        self,
        model,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity ``[R, C, h, w]`` for unpacked ``noisy [R, C, h, w]`` at float
        ``timesteps`` ``σ · T`` (``[R]`` or 0-dim), passed as ``t / 1000``; ``txt_ids`` zeros
        ``[L, 3]``, ``img_ids`` the packed tokens' ids, ``guidance`` ``GUIDANCE_SCALE`` per row when
        the transformer has ``guidance_embeds`` (else None); ``extra`` is unused."""
        rows, _, height, width = noisy.shape
        dtype = embeddings.dtype
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((rows,), GUIDANCE_SCALE, device=noisy.device, dtype=torch.float32)
        tokens = model(
            hidden_states=self.pack(noisy.to(dtype)),
            timestep=(timesteps.to(torch.float32) / TIMESTEP_SCALE).expand(rows).to(dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeddings,
            txt_ids=torch.zeros(embeddings.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=self.image_ids(height, width, noisy.device, dtype),
            return_dict=False,
        )[0]
        return self.unpack(tokens, height, width)

    def sampling_sigmas(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """``[num_steps + 1]`` float32 σ of FluxPipeline's schedule: its ``sigmas = linspace(1,
        1 / num_steps, num_steps)`` given to the scheduler's ``set_timesteps`` with ``mu =
        calculate_shift(image_seq_len)`` under dynamic shifting, then the terminal 0."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                self.image_seq_len(latent_shape),
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.15),
            )
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), **kwargs)
        return scheduler.sigmas.to(torch.float32)
