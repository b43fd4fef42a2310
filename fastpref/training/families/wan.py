"""Wan 2.1 / 2.2 text-to-video (``WanPipeline``): UMT5 text encoder, ``AutoencoderKLWan`` video
VAE, ``WanTransformer3DModel`` denoiser, flow matching (``fastpref.training.flow``).

Latents are 5-D, ``[R, C, F', h, w]`` with ``F' = 1 + (F - 1) / scale_factor_temporal`` latent
frames for ``F = --num_frames`` video frames (Wan 2.1: C 16, factors 4 in time and 8 in space),
normalised per channel by the VAE config's ``latents_mean`` / ``latents_std`` as ``WanPipeline``
un-normalises them before decoding: ``(z - mean) / std``. Prompt embeddings are what the
pipeline's ``_get_t5_prompt_embeds`` makes (read at diffusers 0.42.1, ``pipelines/wan/
pipeline_wan.py``): the UMT5 encoder's last hidden states under the attention mask, cut at each
prompt's length and zero-padded to ``max_sequence_length`` tokens, which here is the tokenizer's
``model_max_length`` capped at the pipeline's default 512 (Wan's ``text_len``). The pooled
embedding, which only RPO reads (the transformer takes none), is the mean of a prompt's token
states. Timesteps are the flow family's float ``σ · T``, shared by every token (Wan 2.2
``expand_timesteps`` pipelines get them per token, as the pipeline passes them).

The training schedule is a ``FlowMatchEulerDiscreteScheduler``: the pipeline's own, or, for a
pipeline shipped with Wan's ``UniPCMultistepScheduler`` in flow mode, one with its
``num_train_timesteps`` and ``flow_shift`` as shift. Two-expert Wan 2.2 pipelines
(``transformer_2``, A14B) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from transformers import AutoTokenizer, UMT5EncoderModel

from ..family import check_pipeline_dir, register, to_device
from ..flow import FlowMatchingFamily
from ..models import add_lora, cast

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention of every block
PIPELINE_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default max_sequence_length
VAE_CHUNK = 4  # AutoencoderKLWan encodes the first frame, then chunks of 4: F = 1 + 4k


def _config(path: Path, subfolder: str, name: str = "config.json") -> dict:
    with open(Path(path) / subfolder / name) as f:
        return json.load(f)


def training_scheduler(path: Path) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching training schedule of the pipeline at ``path`` (see the module docstring);
    ValueError naming ``--pretrained_model_name_or_path`` for a scheduler that is not flow matching."""
    config = _config(path, "scheduler", "scheduler_config.json")
    kind = config.get("_class_name")
    if kind == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    if kind == "UniPCMultistepScheduler" and config.get("use_flow_sigmas"):
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config.get("flow_shift", 1.0)
        )
    raise ValueError(
        f"--pretrained_model_name_or_path: {str(path)!r} has scheduler {kind!r}; a Wan pipeline trains with "
        f"flow matching (FlowMatchEulerDiscreteScheduler, or UniPCMultistepScheduler with use_flow_sigmas)"
    )


@register
class WanFamily(FlowMatchingFamily):
    """Wan text-to-video: latents ``[R, C, F', h, w]``, embeddings ``[R, L, D]`` (UMT5, ``L =
    max_sequence_length``), pooled ``[R, D]`` (mean token state, RPO only). Takes the flow-matching
    flags and the video flags ``--num_frames`` / ``--frame_stride`` (``configure``)."""

    class_names = ("WanPipeline",)
    flag_kinds = ("flow matching", "video")
    media = "videos"
    num_frames: int | None = None  # video frames per clip (``configure``)
    frame_stride: int = 1

    def __init__(
        self,
        tokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        transformer: WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        device: torch.device,
        weight_dtype: torch.dtype,
        *,
        expand_timesteps: bool = False,
    ):
        self.tokenizer, self.text_encoder, self.vae, self.scheduler = tokenizer, text_encoder, vae, scheduler
        self.denoiser, self.device, self.weight_dtype = transformer, device, weight_dtype
        self.expand_timesteps = expand_timesteps
        self.max_sequence_length = min(int(tokenizer.model_max_length), PIPELINE_MAX_SEQUENCE_LENGTH)
        config = vae.config
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1).to(device)

    # --- before loading ---

    @classmethod
    def check(cls, path: Path) -> int:
        path = Path(path)
        check_pipeline_dir(path, PIPELINE_SUBFOLDERS, "Wan")
        index = json.loads((path / "model_index.json").read_text())
        if (index.get("transformer_2") or [None])[0] is not None:
            raise ValueError(
                f"--pretrained_model_name_or_path: {str(path)!r} is a two-expert Wan 2.2 pipeline (transformer_2, "
                f"boundary_ratio {index.get('boundary_ratio')}); fastpref trains one transformer: use a "
                f"single-transformer Wan 2.1 / 2.2 pipeline"
            )
        training_scheduler(path)
        return int(_config(path, "vae")["scale_factor_spatial"])

    @classmethod
    def default_resolution(cls, path: Path) -> None:
        """None: video families train at the data's size by default (the first pair's ``video_0``'s
        shorter side, ``fastpref.training.video_data``)."""
        return None

    @classmethod
    def check_resolution(cls, path: Path, resolution: int) -> None:
        factor = int(_config(path, "vae")["scale_factor_spatial"])
        patch = _config(path, "transformer")["patch_size"]
        multiple = factor * patch[1]
        if resolution % multiple:
            raise ValueError(
                f"--resolution: the Wan transformer packs {patch[1]}x{patch[2]} latent patches, so the resolution "
                f"must be a multiple of {multiple} (VAE factor {factor} x patch {patch[1]}), got {resolution}"
            )

    @classmethod
    def check_num_frames(cls, path: Path, num_frames: int) -> None:
        if num_frames < 1 or (num_frames - 1) % VAE_CHUNK:
            raise ValueError(
                f"--num_frames: AutoencoderKLWan encodes the first frame and then chunks of {VAE_CHUNK} frames, "
                f"so a clip has 1 + {VAE_CHUNK}k frames (1, 5, 9, ..., 33, ..., 81), got {num_frames}"
            )

    @classmethod
    def load(cls, path: Path, device: torch.device, weight_dtype: torch.dtype) -> WanFamily:
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder")
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae")
        transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
        for frozen in (text_encoder, vae):
            frozen.requires_grad_(False).eval().to(device)
            cast(frozen, weight_dtype)
        expand = bool(json.loads((path / "model_index.json").read_text()).get("expand_timesteps", False))
        return cls(
            tokenizer,
            text_encoder,
            vae,
            transformer.to(device),
            training_scheduler(path),
            device,
            weight_dtype,
            expand_timesteps=expand,
        )

    def configure(self, config) -> None:
        """The flow-matching flags, and ``--num_frames`` (required: ``fastpref.training.validation.validate``
        fills it from the data) and ``--frame_stride`` (None: 1)."""
        super().configure(config)
        num_frames = getattr(config, "num_frames", None)
        if num_frames is None:
            raise ValueError("--num_frames: a Wan run needs the clip length; got none")
        self.num_frames, self.frame_stride = int(num_frames), int(getattr(config, "frame_stride", None) or 1)

    # --- set-up of the trainable transformer ---

    def set_attention(self, use_xformers: bool | None) -> str:
        """PyTorch SDPA (diffusers' native attention back-end, the Wan processor's default), or
        xformers through ``set_attention_backend`` when required (``True``)."""
        if not use_xformers:
            return "sdpa"
        try:
            self.denoiser.set_attention_backend("xformers")
        except Exception as error:  # diffusers raises several types when the back-end cannot run
            raise ValueError(
                f"--enable_xformers_memory_efficient_attention: the xformers attention back-end cannot run here "
                f"({type(error).__name__}: {error}); drop the flag to use PyTorch SDPA attention"
            ) from error
        return "xformers"

    def add_lora(self, rank: int) -> list[torch.nn.Parameter]:
        return add_lora(self.denoiser, rank, self.weight_dtype, LORA_TARGET_MODULES)

    def save_weights(self, reference: str, output_dir: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors``, which ``WanPipeline.load_lora_weights``
        reads. Copy: ``transformer/`` via ``save_pretrained``."""
        if reference == "lora":
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
            WanPipeline.save_lora_weights(output_dir, transformer_lora_layers=layers, safe_serialization=True)
        else:
            self.denoiser.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)

    # --- data ---

    def latent_frames(self) -> int:
        """Latent frames ``F' = 1 + (F - 1) / scale_factor_temporal`` of a ``--num_frames`` clip."""
        if self.num_frames is None:
            raise ValueError("--num_frames: not set; call configure(config) first")
        return 1 + (self.num_frames - 1) // int(self.vae.config.scale_factor_temporal)

    def latent_shape(self, resolution: int) -> tuple[int, int, int, int]:
        size = resolution // int(self.vae.config.scale_factor_spatial)
        return int(self.vae.config.z_dim), self.latent_frames(), size, size

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``N`` captions -> ``([N, L, D], [N, D])``, equal to ``WanPipeline._get_t5_prompt_embeds``
        at ``max_sequence_length = L``: the encoder runs on the longest prompt's length only (the
        attention mask hides the padding from every kept token, so the kept states do not depend on
        it) and the states are zero-padded to ``L``."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        text = self.tokenizer(
            [prompt_clean(c) for c in captions],
            padding="longest",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = to_device(text.input_ids, self.device), to_device(text.attention_mask, self.device)
        with torch.no_grad():
            states = self.text_encoder(ids, mask).last_hidden_state
        keep = mask[..., None].to(states.dtype)
        states = states * keep  # the pipeline keeps u[:seq_len] and pads zeros
        pooled = states.sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        embeddings = F.pad(states, (0, 0, 0, self.max_sequence_length - states.shape[1]))
        return embeddings.to(self.weight_dtype), pooled.to(self.weight_dtype)

    def prepare_images(
        self,
        images: list[str],
        resolution: int,
        *,
        random_crop: bool,
        hflip: bool,
        generator: torch.Generator,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One stream item's video files -> ``[3, F, resolution, resolution]`` clips (``F =
        --num_frames`` frames at ``--frame_stride``, ``video_data.load_video_pixels``) and no extra
        conditioning (``[0]``)."""
        from ..video_data import load_video_pixels

        clips = load_video_pixels(
            images,
            resolution,
            num_frames=self.num_frames,
            frame_stride=self.frame_stride,
            random_crop=random_crop,
            hflip=hflip,
            generator=generator,
        )
        return clips, torch.zeros(0)

    def encode_images(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        """``[N, 3, F, H, W]`` clips in [-1, 1] -> ``[N, C, F', h, w]`` normalised latents."""
        with torch.no_grad():
            dist = self.vae.encode(to_device(pixels, self.device).to(self.weight_dtype)).latent_dist
        latents = dist.mean.float() + dist.std.float() * to_device(latent_eps, self.device)
        return (latents - self.latents_mean) / self.latents_std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, C, F', h, w]`` normalised latents -> ``[N, 3, F, H, W]`` clips in [-1, 1]."""
        with torch.no_grad():
            z = latents.float() * self.latents_std + self.latents_mean
            return self.vae.decode(z.to(self.weight_dtype)).sample

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
        """The transformer's velocity ``[R, C, F', h, w]`` at float ``timesteps`` ``[R]`` (or 0-dim:
        every row), conditioned on ``embeddings`` only (``pooled`` and ``extra`` are not inputs of
        Wan's transformer)."""
        rows = noisy.shape[0]
        t = timesteps.expand(rows) if timesteps.ndim == 0 else timesteps
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per token (patch), all alike for text-to-video
            p_t, p_h, p_w = self.denoiser.config.patch_size
            tokens = (noisy.shape[2] // p_t) * (noisy.shape[3] // p_h) * (noisy.shape[4] // p_w)
            t = t[:, None].expand(rows, tokens)
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=embeddings, return_dict=False)[0]
