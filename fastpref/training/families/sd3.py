"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): ``SD3Transformer2DModel`` trained
with flow matching (``fastpref.training.flow``), two CLIP text encoders with projection (CLIP-L,
CLIP-G) and an optional T5 encoder, conditioned as the pipeline conditions it: the CLIP
penultimate hidden states side by side, zero-padded to the T5 width and followed by the T5
states (zeros when the pipeline has no T5), and the two CLIP projections concatenated as the
pooled projections."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from ..family import check_pipeline_dir, register, to_device
from ..flow import FlowMatchingFamily
from ..models import add_lora, cast, set_attention, vae_decode, vae_encode

# diffusers' train_dreambooth_lora_sd3.py default --lora_layers: the joint attention's image and text projections
LORA_TARGET_MODULES = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
PIPELINE_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 length, also the length of the zeros without T5


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _has_t5(path: Path) -> bool:
    """Whether the pipeline ``path`` names a ``text_encoder_3`` (the pipeline allows None)."""
    entry = _read_json(Path(path) / "model_index.json").get("text_encoder_3")
    return isinstance(entry, list) and entry[0] is not None and (Path(path) / "text_encoder_3").is_dir()


@register
class StableDiffusion3Family(FlowMatchingFamily):
    """SD3/SD3.5: latents ``[R, C, H/f, W/f]`` (C = the VAE's latent channels, 16 for SD3),
    embeddings ``[R, 77 + 256, D_joint]`` (CLIP-L | CLIP-G penultimate states padded to the T5
    width ``D_joint`` = ``joint_attention_dim``, then the T5 states or zeros), pooled ``[R, P]``
    (CLIP-L's and CLIP-G's projected pooled outputs concatenated, ``P = pooled_projection_dim``).
    The CLIP length is the tokenizers' ``model_max_length`` (77 for SD3)."""

    class_names = ("StableDiffusion3Pipeline",)

    def __init__(
        self,
        tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
        text_encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
        t5: tuple | None,
        vae: AutoencoderKL,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        device: torch.device,
        weight_dtype: torch.dtype,
    ):
        """``t5``: ``(tokenizer_3, text_encoder_3)`` or None (zeros for the T5 part, as the pipeline)."""
        self.tokenizers, self.text_encoders, self.t5 = tokenizers, text_encoders, t5
        self.vae, self.scheduler = vae, scheduler
        self.denoiser, self.device, self.weight_dtype = transformer, device, weight_dtype

    # --- before loading ---

    @classmethod
    def check(cls, path: Path) -> int:
        path = Path(path)
        check_pipeline_dir(path, PIPELINE_SUBFOLDERS, "StableDiffusion3Pipeline", " (text_encoder_3 optional)")
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json").get("_class_name")
        if scheduler != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"--pretrained_model_name_or_path: expected scheduler FlowMatchEulerDiscreteScheduler in "
                f"{str(path / 'scheduler')!r}, got {scheduler!r}"
            )
        return 2 ** (len(_read_json(path / "vae" / "config.json")["block_out_channels"]) - 1)

    @classmethod
    def default_resolution(cls, path: Path) -> int:
        """The transformer's ``sample_size`` (latent side) times the VAE factor (SD3: 128 x 8)."""
        path = Path(path)
        factor = 2 ** (len(_read_json(path / "vae" / "config.json")["block_out_channels"]) - 1)
        return int(_read_json(path / "transformer" / "config.json")["sample_size"]) * factor

    @classmethod
    def check_resolution(cls, path: Path, resolution: int) -> None:
        """The latent side must be a multiple of the patch size (the pipeline's own check) and its
        patches must fit the position table (``pos_embed_max_size``)."""
        path = Path(path)
        factor = 2 ** (len(_read_json(path / "vae" / "config.json")["block_out_channels"]) - 1)
        config = _read_json(path / "transformer" / "config.json")
        patch, table = int(config.get("patch_size", 2)), config.get("pos_embed_max_size", 96)
        if resolution % (factor * patch):
            raise ValueError(
                f"--resolution: SD3's transformer takes {patch}x{patch} patches of the latent, expected a "
                f"multiple of {factor * patch} (VAE factor {factor} x patch size {patch}), got {resolution}"
            )
        if table is not None and resolution // (factor * patch) > table:
            raise ValueError(
                f"--resolution: SD3's transformer has {table} positions per side (pos_embed_max_size), expected "
                f"at most {table * factor * patch} px, got {resolution}"
            )

    @classmethod
    def load(cls, path: Path, device: torch.device, weight_dtype: torch.dtype) -> StableDiffusion3Family:
        tokenizers = tuple(CLIPTokenizer.from_pretrained(path, subfolder=s) for s in ("tokenizer", "tokenizer_2"))
        encoders = tuple(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder=s) for s in ("text_encoder", "text_encoder_2")
        )
        t5 = None
        if _has_t5(path):
            from transformers import AutoTokenizer, T5EncoderModel

            t5 = (
                AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3"),
                T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3"),
            )
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        for frozen in (*encoders, vae, *(() if t5 is None else (t5[1],))):
            frozen.requires_grad_(False).eval().to(device)
            cast(frozen, weight_dtype)
        return cls(tokenizers, encoders, t5, vae, transformer.to(device), scheduler, device, weight_dtype)

    # --- the trainable denoiser ---

    def set_attention(self, use_xformers: bool | None) -> str:
        return set_attention(self.denoiser, use_xformers, JointAttnProcessor2_0())

    def add_lora(self, rank: int) -> list[torch.nn.Parameter]:
        return add_lora(self.denoiser, rank, self.weight_dtype, LORA_TARGET_MODULES)

    def save_weights(self, reference: str, output_dir: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` as diffusers' SD3 LoRA script writes it
        (``StableDiffusion3Pipeline.load_lora_weights`` reads it). Copy: ``transformer/`` via
        ``save_pretrained``."""
        if reference == "lora":
            StableDiffusion3Pipeline.save_lora_weights(
                output_dir, transformer_lora_layers=get_peft_model_state_dict(self.denoiser), safe_serialization=True
            )
        else:
            self.denoiser.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)

    # --- data ---

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, size, size

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        patch = self.denoiser.config.patch_size
        return (latent_shape[-2] // patch) * (latent_shape[-1] // patch)

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``N`` captions -> ``(embeddings [N, L_clip + 256, D_joint], pooled [N, P])`` as
        ``StableDiffusion3Pipeline.encode_prompt`` builds them (no clip skip), weight dtype."""
        states, pooled = [], []
        with torch.no_grad():
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
                ids = tokenizer(
                    captions,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                out = encoder(to_device(ids, self.device), output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled.append(out[0])
            clip = torch.cat(states, dim=-1)
            width = self.denoiser.config.joint_attention_dim
            if self.t5 is None:
                t5 = torch.zeros(len(captions), MAX_SEQUENCE_LENGTH, width, dtype=clip.dtype, device=self.device)
            else:
                tokenizer, encoder = self.t5
                ids = tokenizer(
                    captions,
                    padding="max_length",
                    max_length=MAX_SEQUENCE_LENGTH,
                    truncation=True,
                    add_special_tokens=True,
                    return_tensors="pt",
                ).input_ids
                t5 = encoder(to_device(ids, self.device))[0].to(clip.dtype)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def encode_images(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        """``(z - shift_factor) · scaling_factor`` of the VAE posterior sample ``z`` (the SD3 scripts')."""
        return vae_encode(self.vae, pixels, latent_eps, self.device, self.weight_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents, self.weight_dtype)

    # --- the step ---

    def denoise(
        self,
        model,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity ``[R, C, h, w]`` at float ``timesteps`` ``σ · T`` (``[R]`` or
        0-dim, broadcast as the pipeline does); ``extra`` is unused (SD3 has no extra conditioning)."""
        return model(
            hidden_states=noisy,
            timestep=timesteps.expand(noisy.shape[0]),
            encoder_hidden_states=embeddings,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
