"""Build the bundled tiny Stable-Diffusion pipeline and its preference set from scratch.

    OMP_NUM_THREADS=1 python -m fastpref.tiny.build --output_dir fastpref/assets   # ~15 min on 1 core

1. a CLIP tokenizer learnt from the caption words and a random, frozen tiny CLIP text encoder;
2. a KL autoencoder trained to reconstruct procedural shape images (``shapes.py``);
3. a UNet pretrained with the epsilon objective on those images' latents (10% empty captions,
   so classifier-free guidance works);
4. the preference set: two samples of the pretrained pipeline per prompt, the winner being the
   more colourful one (``reward.py``), made by ``fastpref-pairs``' pair maker and written in the
   Pick-a-Pic parquet layout.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusionPipeline

from fastpref.pairs.generate import score_and_pair
from fastpref.pairs.rewards import load_reward
from fastpref.pairs.writer import ImagePairsFormat

from .models import tiny_scheduler, tiny_text_encoder, tiny_unet, tiny_vae
from .shapes import CAPTION_WORDS, random_dataset, random_prompts
from .tokenizer import build_tokenizer

MAX_CAPTION_TOKENS = 8


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 to ``[N, 3, H, W]`` float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(steps: int, batch_size: int, seed: int, log_every: int = 100):
    """Train the tiny autoencoder on fresh procedural images; sets its latent scaling factor."""
    torch.manual_seed(seed)
    vae = tiny_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        x = to_pixels(random_dataset(batch_size, seed=seed * 1_000_003 + step)[0])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            value = loss.item()  # host-ok: offline build script, progress print
            print(f"vae step {step}: loss {value:.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = to_pixels(random_dataset(512, seed=seed + 7)[0])
        std = vae.encode(x).latent_dist.sample().std().item()  # host-ok: offline build script, one-time latent scale
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def train_unet(vae, tokenizer, text_encoder, steps: int, batch_size: int, seed: int, log_every: int = 100):
    """Pretrain the tiny UNet (epsilon prediction) on latents of fresh procedural images."""
    torch.manual_seed(seed)
    unet = tiny_unet(text_encoder.config.hidden_size)
    scheduler = tiny_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        images, prompts = random_dataset(batch_size, seed=seed * 1_000_003 + step)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        with torch.no_grad():
            latents = vae.encode(to_pixels(images)).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeddings = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, embeddings).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            value = loss.item()  # host-ok: offline build script, progress print
            print(f"unet step {step}: loss {value:.4f}", flush=True)
    return unet.eval().requires_grad_(False)


def build_preference_table(pipe, num_pairs: int, seed: int) -> pa.Table:
    """``num_pairs`` pairs of pipeline samples labelled by ``colourfulness``, made by the
    product's pair maker (``fastpref.pairs.generate.score_and_pair``: JPEG quality 95, scored as
    stored, every pair kept, ties labelled 0.5) from this builder's own prompts and seeds.

    Columns follow Pick-a-Pic: ``jpg_0``, ``jpg_1`` (JPEG bytes), ``label_0`` (1.0 when image 0
    wins, 0.0 when image 1 wins, 0.5 on an exact tie), ``caption``.
    """
    rng = np.random.default_rng(seed)
    prompts = random_prompts(num_pairs, rng)
    seeds = rng.choice(
        2**31 - 1, size=2 * num_pairs, replace=False
    ).tolist()  # host-ok: numpy seeds in the offline build script
    fmt = ImagePairsFormat("jpeg")
    rows, _ = score_and_pair(
        pipe,
        load_reward("colourfulness"),
        prompts,
        list(range(num_pairs)),
        np.array([seeds[:num_pairs], seeds[num_pairs:]], dtype=np.int64).T,
        fmt=fmt,
        min_margin=None,
        batch_size=128,
    )
    return fmt.table(rows).select(["jpg_0", "jpg_1", "label_0", "caption"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parents[1] / "assets"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=300)
    parser.add_argument("--unet_steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_pairs", type=int, default=512)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    start = time.time()

    tokenizer = build_tokenizer(CAPTION_WORDS, MAX_CAPTION_TOKENS)
    torch.manual_seed(args.seed)
    text_encoder = tiny_text_encoder(tokenizer).eval().requires_grad_(False)
    vae = train_vae(args.vae_steps, args.batch_size, args.seed)
    unet = train_unet(vae, tokenizer, text_encoder, args.unet_steps, args.batch_size, args.seed)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "tiny-sd", safe_serialization=True)
    table = build_preference_table(pipe, args.num_pairs, args.seed + 1)
    pq.write_table(table, out / "tiny-prefs.parquet")
    labels = table.column("label_0").to_numpy()
    print(
        f"wrote {out / 'tiny-sd'} and {len(labels)} pairs "
        f"({(labels == 0.5).sum()} ties) to {out / 'tiny-prefs.parquet'} in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
