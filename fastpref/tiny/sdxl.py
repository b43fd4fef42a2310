"""Build the bundled tiny SDXL pipeline (``fastpref/assets/tiny-sdxl``) and its preference set.

    OMP_NUM_THREADS=1 python -m fastpref.tiny.sdxl --output_dir fastpref/assets   # see docs/training.md

A ``StableDiffusionXLPipeline`` directory in the SDXL layout at toy size:

1. tokenizer and tokenizer_2: the tiny caption tokenizer (``tokenizer.py``), 8 tokens;
2. text_encoder: a random, frozen 2-layer CLIP text model (``CLIPTextModel``, 32 wide);
   text_encoder_2: a random, frozen 2-layer ``CLIPTextModelWithProjection`` (32 wide, pooled
   ``text_embeds`` of 32); the UNet reads both penultimate hidden states concatenated (64 wide)
   and the pooled ``text_embeds``, as SDXL does;
3. vae: the tiny SD VAE, shared with ``fastpref/assets/tiny-sd`` (copied, factor 4, 8 x 8 x 4
   latents at 32 px);
4. unet: a 2-level ``UNet2DConditionModel`` in SDXL's layout (first level without attention,
   linear projections, ``addition_embed_type="text_time"``: the pooled text and the six time ids
   (original size, crop top-left, target size) added to the timestep embedding), pretrained with
   the epsilon objective on the procedural images' latents at the time ids of an uncropped 32 px
   image, ``(32, 32, 0, 0, 32, 32)``; 10 % of the captions dropped to zero embeddings (text and
   pooled), which is what the pipeline's ``force_zeros_for_empty_prompt`` feeds as the
   unconditional input of classifier-free guidance;
5. the preference set ``tiny-sdxl-prefs.parquet``: two samples of this pipeline per prompt,
   winner = the more colourful (``reward.py``), Pick-a-Pic layout (as ``build.py`` makes the SD1.5
   one).
"""

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .build import MAX_CAPTION_TOKENS, build_preference_table, to_pixels
from .models import RESOLUTION, VAE_FACTOR, tiny_scheduler, tiny_text_encoder
from .shapes import CAPTION_WORDS, random_dataset
from .tokenizer import build_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEXT_WIDTH = 32  # each text encoder's hidden size; the UNet's cross-attention width is twice this
POOLED_WIDTH = 32  # text_encoder_2's projection_dim: the pooled ``text_embeds``
TIME_EMBED_DIM = 8  # addition_time_embed_dim: sinusoidal features per time id
NUM_TIME_IDS = 6  # (original height, width, crop top, left, target height, width)


def tiny_text_encoder_2(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """A 2-layer, 32-wide CLIP text encoder with a 32-wide projection (SDXL's second encoder)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=POOLED_WIDTH,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout at toy size on ``[N, 4, 8, 8]`` latents: ``DownBlock2D`` then
    ``CrossAttnDownBlock2D`` (and the mirrored up blocks), linear projections, cross-attention
    over the 64-wide concatenated text states, ``text_time`` added conditioning of input width
    ``POOLED_WIDTH + NUM_TIME_IDS * TIME_EMBED_DIM``."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=POOLED_WIDTH + NUM_TIME_IDS * TIME_EMBED_DIM,
    )


def untrained_pipeline(seed: int, vae_dir: Path) -> StableDiffusionXLPipeline:
    """The pipeline with its random text encoders (seeded), the shared tiny VAE read from
    ``vae_dir`` and a random UNet."""
    tokenizer = build_tokenizer(CAPTION_WORDS, MAX_CAPTION_TOKENS)
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(tokenizer).eval().requires_grad_(False)
    text_encoder_2 = tiny_text_encoder_2(tokenizer).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(CAPTION_WORDS, MAX_CAPTION_TOKENS),
        unet=tiny_sdxl_unet(),
        scheduler=tiny_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def train_unet(pipe: StableDiffusionXLPipeline, steps: int, batch_size: int, seed: int, log_every: int = 100):
    """Pretrain ``pipe.unet`` (epsilon prediction) on latents of fresh procedural images, the
    conditioning encoded by the pipeline itself (``encode_prompt``, ``_get_add_time_ids``)."""
    torch.manual_seed(seed)
    unet, vae, scheduler = pipe.unet.train().requires_grad_(True), pipe.vae, pipe.scheduler
    time_ids = pipe._get_add_time_ids(
        (RESOLUTION, RESOLUTION),
        (0, 0),
        (RESOLUTION, RESOLUTION),
        dtype=torch.float32,
        text_encoder_projection_dim=POOLED_WIDTH,
    ).repeat(batch_size, 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        images, prompts = random_dataset(batch_size, seed=seed * 1_000_003 + step)
        keep = torch.from_numpy(rng.random(batch_size) >= 0.1).float()
        with torch.no_grad():
            latents = vae.encode(to_pixels(images)).latent_dist.sample() * vae.config.scaling_factor
            embeddings, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        embeddings, pooled = embeddings * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        pred = unet(
            scheduler.add_noise(latents, noise, t),
            t,
            embeddings,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            value = loss.item()  # host-ok: offline build script, progress print
            print(f"unet step {step}: loss {value:.4f}", flush=True)
    unet.eval().requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(ASSETS))
    parser.add_argument("--vae_dir", default=str(ASSETS / "tiny-sd" / "vae"), help="the shared tiny VAE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet_steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_pairs", type=int, default=512)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    start = time.time()
    pipe = untrained_pipeline(args.seed, Path(args.vae_dir))
    train_unet(pipe, args.unet_steps, args.batch_size, args.seed)
    target = out / "tiny-sdxl"
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target, safe_serialization=True)
    shutil.rmtree(target / "vae")
    shutil.copytree(args.vae_dir, target / "vae")  # the shared VAE, byte for byte
    table = build_preference_table(pipe, args.num_pairs, args.seed + 1)
    pq.write_table(table, out / "tiny-sdxl-prefs.parquet")
    labels = table.column("label_0").to_numpy()
    print(
        f"wrote {target} and {len(labels)} pairs ({(labels == 0.5).sum()} ties) to "
        f"{out / 'tiny-sdxl-prefs.parquet'} in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
