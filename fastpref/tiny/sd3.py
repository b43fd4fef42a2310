"""Build the bundled tiny SD3 pipeline (``fastpref/assets/tiny-sd3``) and its preference set.

    OMP_NUM_THREADS=1 python -m fastpref.tiny.sd3 --output_dir fastpref/assets   # a few minutes on 1 core

1. the tiny SD pipeline's KL autoencoder, copied with ``shift_factor: 0.0`` (the SD3 pipeline
   adds it when decoding) and the caption tokenizer (twice: CLIP-L's and CLIP-G's slot);
2. two random, frozen tiny CLIP text encoders with projection and a random, frozen 1-layer T5
   (``tiny/t5.py``), so that ``StableDiffusion3Pipeline.from_pretrained`` needs no argument (a
   pipeline without T5 is also trained: the tests build one);
3. a 3-layer ``SD3Transformer2DModel`` pretrained with the flow-matching objective (logit-normal
   σ, the scheduler's shift 3) on the procedural shape images' latents, 10% empty captions so
   classifier-free guidance works;
4. the preference set: two samples of the pretrained ``StableDiffusion3Pipeline`` per prompt,
   the winner the more colourful one (``reward.py``), in the Pick-a-Pic parquet layout
   (``tiny-sd3-prefs.parquet``).
"""

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from ..training.families.sd3 import StableDiffusion3Family
from .build import MAX_CAPTION_TOKENS, build_preference_table, to_pixels
from .models import RESOLUTION, VAE_FACTOR
from .shapes import CAPTION_WORDS, random_dataset
from .t5 import build_t5_tokenizer, tiny_t5_encoder
from .tokenizer import build_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLIP_WIDTH = 32  # hidden and projection width of each tiny CLIP encoder
SHIFT = 1.0


def tiny_clip_with_projection(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """A 2-layer, 32-wide CLIP text encoder with a 32-wide projection, sized to ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_WIDTH,
        intermediate_size=2 * CLIP_WIDTH,
        projection_dim=CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def tiny_transformer() -> SD3Transformer2DModel:
    """A 3-layer, 32-wide SD3 transformer on ``[N, 4, 8, 8]`` latents (2x2 patches: 16 tokens);
    text states of width 64 (the two CLIP encoders side by side) and 64-wide pooled projections."""
    return SD3Transformer2DModel(
        sample_size=RESOLUTION // VAE_FACTOR,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=2 * CLIP_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=16,
    )


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's flow-matching Euler scheduler: 1000 training timesteps, shift 3."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def shared_vae(tiny_sd: Path = ASSETS / "tiny-sd") -> AutoencoderKL:
    """The tiny SD pipeline's autoencoder with ``shift_factor`` 0.0 (SD3 reads a number there)."""
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def pretrain(
    family: StableDiffusion3Family, steps: int, batch_size: int, seed: int, pool: int = 4096, log_every: int = 100
):
    """Train ``family.denoiser`` with the flow-matching objective ``|v_θ(x_t, t) - (ε - x0)|²``
    (σ drawn as the trainer draws it) on ``pool`` procedural images, VAE-encoded once (a fresh
    posterior sample each time an image is drawn); each caption is encoded once."""
    torch.manual_seed(seed)
    images, prompts = random_dataset(pool, seed=seed * 1_000_003)
    with torch.no_grad():
        dists = [family.vae.encode(to_pixels(images[i : i + 256])).latent_dist for i in range(0, pool, 256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    vocabulary = sorted(set(prompts)) + [""]
    embeddings, pooled = family.encode_prompts(vocabulary)
    caption_index = torch.tensor([vocabulary.index(p) for p in prompts])
    config = family.vae.config
    transformer = family.denoiser.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(pool, (batch_size,), generator=g)
        z = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)
        latents = (z - config.shift_factor) * config.scaling_factor  # as StableDiffusion3Family.encode_images
        words = torch.where(torch.rand(batch_size, generator=g) < 0.1, len(vocabulary) - 1, caption_index[rows])
        noise = torch.randn(latents.shape, generator=g)
        t = torch.stack([family.draw_timestep(g) for _ in range(batch_size)])
        noisy, target = family.add_noise(latents, noise, t)
        loss = torch.nn.functional.mse_loss(
            family.denoise(transformer, noisy, t, embeddings[words], pooled[words]), target
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            value = loss.item()  # host-ok: offline build script, progress print
            print(f"transformer step {step}: loss {value:.4f}", flush=True)
    return transformer.eval().requires_grad_(False)


def build_pipeline(steps: int, batch_size: int, seed: int) -> StableDiffusion3Pipeline:
    """The pretrained tiny ``StableDiffusion3Pipeline``."""
    tokenizer = build_tokenizer(CAPTION_WORDS, MAX_CAPTION_TOKENS)
    t5_tokenizer = build_t5_tokenizer(CAPTION_WORDS)
    torch.manual_seed(seed)
    encoders = tuple(tiny_clip_with_projection(tokenizer).eval().requires_grad_(False) for _ in range(2))
    t5 = tiny_t5_encoder(t5_tokenizer, 2 * CLIP_WIDTH).eval().requires_grad_(False)
    vae, scheduler = shared_vae(), tiny_scheduler()
    family = StableDiffusion3Family(
        (tokenizer, tokenizer),
        encoders,
        (t5_tokenizer, t5),
        vae,
        tiny_transformer(),
        scheduler,
        torch.device("cpu"),
        torch.float32,
    )
    transformer = pretrain(family, steps, batch_size, seed)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(ASSETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_pairs", type=int, default=256)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    start = time.time()
    pipe = build_pipeline(args.steps, args.batch_size, args.seed)
    pipe.save_pretrained(out / "tiny-sd3", safe_serialization=True)
    table = build_preference_table(pipe, args.num_pairs, args.seed + 1)
    pq.write_table(table, out / "tiny-sd3-prefs.parquet")
    labels = table.column("label_0").to_numpy()
    print(
        f"wrote {out / 'tiny-sd3'} and {len(labels)} pairs ({(labels == 0.5).sum()} ties) to "
        f"{out / 'tiny-sd3-prefs.parquet'} in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
