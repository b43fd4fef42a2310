"""Stable Diffusion 1.5 architecture configurations with random weights (no download)."""

from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .shapes import CAPTION_WORDS
from .tokenizer import build_tokenizer


def sd15_unet() -> UNet2DConditionModel:
    """The SD1.5 UNet architecture (860M parameters), randomly initialised."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd15_vae() -> AutoencoderKL:
    """The SD1.5 VAE architecture (factor 8), randomly initialised."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd15_scheduler() -> DDPMScheduler:
    """SD1.5's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def write_sd15_pipeline(path: str | Path) -> Path:
    """Write a random-weight SD1.5-architecture pipeline directory (CLIP-L-sized text encoder,
    the tiny caption tokenizer padded to 77 tokens) for ``fastpref-train`` at real size."""
    tokenizer = build_tokenizer(CAPTION_WORDS, 77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=sd15_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=sd15_unet(),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m fastpref.tiny.sd15 DIR   (writes a random-weight SD1.5 pipeline to DIR)")
    print(f"wrote {write_sd15_pipeline(sys.argv[1])}")
