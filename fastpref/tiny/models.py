"""Configurations of the tiny Stable-Diffusion-layout components (random initialisation)."""

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

RESOLUTION = 32
VAE_FACTOR = 4  # three encoder levels: 32 px images, 8 x 8 latents


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text encoder sized to ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def tiny_vae() -> AutoencoderKL:
    """A 3-level KL autoencoder: ``[N, 3, 32, 32]`` images to ``[N, 4, 8, 8]`` latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def tiny_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """A 2-level conditional UNet on ``[N, 4, 8, 8]`` latents with cross-attention."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def tiny_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training noise schedule (1000 steps, scaled-linear betas, epsilon)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
