"""Build the bundled tiny Flux pipeline (``fastpref/assets/tiny-flux``) and its preference set.

    OMP_NUM_THREADS=1 python -m fastpref.tiny.flux --output_dir fastpref/assets   # see docs/training.md

1. vae: the tiny SD pipeline's KL autoencoder, copied with ``shift_factor: 0.0`` (Flux reads a
   number there; factor 4, 8 x 8 x 4 latents at 32 px);
2. tokenizer / text_encoder: the caption tokenizer and a random, frozen 2-layer CLIP text model
   (its ``pooler_output``, 32 wide, is Flux's pooled projection input);
3. tokenizer_2 / text_encoder_2: a T5 tokenizer (``T5TokenizerFast``, Unigram) whose vocabulary is
   the caption words, one token each, and a random, frozen 1-layer ``T5EncoderModel`` 32 wide;
4. transformer: a ``FluxTransformer2DModel`` with one double-stream and one single-stream block,
   32 wide, ``guidance_embeds`` False, on 2x2-packed latents (16 tokens of 16 channels),
   pretrained with the flow-matching objective (σ drawn as the trainer draws it) on the
   procedural images' latents, 10 % empty captions so classifier-free guidance works; its config
   carries ``sample_size`` 8 (latent side; not a constructor argument, diffusers keeps it in the
   config) so that the trainer's default resolution is 32 px, not FluxPipeline's 128 x factor;
5. scheduler: Flux's ``FlowMatchEulerDiscreteScheduler`` config (dynamic shifting);
6. the preference set ``tiny-flux-prefs.parquet``: two samples of this pipeline per prompt, winner
   = the more colourful (``reward.py``), Pick-a-Pic layout (as ``build.py`` makes the SD1.5 one).
"""

import argparse
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from ..training.families.flux import FluxFamily
from .build import MAX_CAPTION_TOKENS, build_preference_table, to_pixels
from .models import RESOLUTION, VAE_FACTOR, tiny_text_encoder
from .shapes import CAPTION_WORDS, random_dataset
from .tokenizer import build_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WIDTH = 32  # CLIP and T5 hidden width: the transformer's pooled_projection_dim and joint_attention_dim


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no sentinel ids) whose Unigram
    vocabulary holds each caption word as one ``▁word`` token."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -1.0) for word in dict.fromkeys(CAPTION_WORDS)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_t5(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """A 1-layer, 32-wide T5 encoder sized to ``tokenizer``."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=WIDTH,
        d_kv=16,
        d_ff=2 * WIDTH,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def tiny_transformer() -> FluxTransformer2DModel:
    """A Flux transformer with one double- and one single-stream block, 2 heads of 16 (rotary axes
    4 + 6 + 6), on packed ``[N, 16, 16]`` latents (4 channels x 2 x 2), text width 32, pooled 32."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux's scheduler configuration: 1000 timesteps, shift 3, resolution-dependent shifting."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )


def shared_vae(tiny_sd: Path = ASSETS / "tiny-sd") -> AutoencoderKL:
    """The tiny SD pipeline's autoencoder with ``shift_factor`` 0.0."""
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def pretrain(family: FluxFamily, steps: int, batch_size: int, seed: int, pool: int = 4096, log_every: int = 50):
    """Train ``family.denoiser`` with the flow-matching objective ``|v_θ(x_t, t) - (ε - x0)|²``
    through ``family.denoise`` (packing included) on ``pool`` procedural images, VAE-encoded once
    (a fresh posterior sample each draw); each distinct caption is encoded once."""
    torch.manual_seed(seed)
    images, prompts = random_dataset(pool, seed=seed * 1_000_003)
    with torch.no_grad():
        dists = [family.vae.encode(to_pixels(images[i : i + 256])).latent_dist for i in range(0, pool, 256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    vocabulary = sorted(set(prompts)) + [""]
    embeddings, pooled = family.encode_prompts(vocabulary)
    caption_index = torch.tensor([vocabulary.index(p) for p in prompts])
    transformer = family.denoiser.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(pool, (batch_size,), generator=g)
        z = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)
        latents = (z - family.vae.config.shift_factor) * family.vae.config.scaling_factor  # as encode_images
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


def build_pipeline(steps: int, batch_size: int, seed: int) -> FluxPipeline:
    """The pretrained tiny ``FluxPipeline``."""
    tokenizer, tokenizer_2 = build_tokenizer(CAPTION_WORDS, MAX_CAPTION_TOKENS), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip = tiny_text_encoder(tokenizer).eval().requires_grad_(False)
    t5 = tiny_t5(tokenizer_2).eval().requires_grad_(False)
    vae, scheduler = shared_vae(), tiny_scheduler()
    family = FluxFamily(
        (tokenizer, tokenizer_2), (clip, t5), vae, tiny_transformer(), scheduler, torch.device("cpu"), torch.float32
    )
    transformer = pretrain(family, steps, batch_size, seed)
    transformer.register_to_config(sample_size=RESOLUTION // VAE_FACTOR)  # the trainer's default resolution
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(ASSETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_pairs", type=int, default=32)
    parser.add_argument(
        "--prefs_only", action="store_true", help="keep <output_dir>/tiny-flux, (re)make only its preference set"
    )
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    start = time.time()
    if args.prefs_only:
        pipe = FluxPipeline.from_pretrained(out / "tiny-flux", local_files_only=True)
    else:
        pipe = build_pipeline(args.steps, args.batch_size, args.seed)
        pipe.save_pretrained(out / "tiny-flux", safe_serialization=True)
    table = build_preference_table(pipe, args.num_pairs, args.seed + 1)
    pq.write_table(table, out / "tiny-flux-prefs.parquet")
    labels = table.column("label_0").to_numpy()
    print(
        f"wrote {out / 'tiny-flux'} and {len(labels)} pairs ({(labels == 0.5).sum()} ties) to "
        f"{out / 'tiny-flux-prefs.parquet'} in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
