"""Build the bundled tiny Wan pipeline (``fastpref/assets/tiny-wan``) and its video preference set.

    OMP_NUM_THREADS=1 python -m fastpref.tiny.wan --output_dir fastpref/assets   # see docs/training.md

A ``WanPipeline`` directory in the Wan 2.1 / 2.2 layout at toy size, for 9-frame 32 x 32 clips of
the procedural moving shapes (``motion.py``):

1. tokenizer: a UMT5-layout ``T5Tokenizer`` over the caption words (``umt5.py``), model_max_length
   ``MAX_SEQUENCE_LENGTH`` (the family and the demo encode prompts at that length);
   text_encoder: a random, frozen 2-layer ``UMT5EncoderModel``, 32 wide;
2. vae: a constructed ``AutoencoderKLWan`` in Wan 2.2's residual layout (``wan_vae.py``): factor
   4 in space and 2 in time, 4 latent channels, so a 9-frame clip is a ``[4, 5, 8, 8]`` latent;
3. transformer: a ``WanTransformer3DModel`` (patch 1x2x2: 80 tokens per clip), pretrained with the
   flow-matching objective (``x_t = (1 - σ) x0 + σ ε``, target ``ε - x0``, logit-normal σ shifted
   by the scheduler, as the trainer draws it) on a bank of procedural clips' latents, 10 % of the
   captions replaced by the empty prompt so that classifier-free guidance works;
4. scheduler: ``FlowMatchEulerDiscreteScheduler`` (T = 1000, shift ``SHIFT``);
5. the preference set ``tiny-wan-prefs.parquet`` (a video index: ``video_0``, ``video_1`` paths of
   mp4 files under ``tiny-wan-prefs/videos/``, ``label_0``, ``caption``): two samples of the
   pretrained pipeline per prompt, winner = the faster motion (``motion_reward.motion_speed``,
   read from the written mp4 files, as the trainer reads them).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.training_utils import compute_density_for_timestep_sampling

from ..pairs.sampling import sample_videos
from ..training.video_data import read_video, write_video
from .motion import CAPTION_WORDS, NUM_FRAMES, SIZE, random_prompts, random_videos
from .motion_reward import motion_speed
from .umt5 import build_umt5_tokenizer, tiny_umt5
from .wan_vae import identity_init, latent_statistics, tiny_wan_vae, to_pixels

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAX_SEQUENCE_LENGTH = 16  # the tiny tokenizer's model_max_length: captions are 6 tokens with </s>
SHIFT = 1.0
TEXT_WIDTH = 32


def tiny_wan_transformer(latent_channels: int) -> WanTransformer3DModel:
    """A 4-block ``WanTransformer3DModel`` (4 heads of 16, feed-forward 128) on ``[N, C, F', 8, 8]``
    latents with 2x2 patches, cross-attending to 32-wide UMT5 states."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=TEXT_WIDTH,
        freq_dim=64,
        ffn_dim=128,
        num_layers=4,
        rope_max_seq_len=64,
    )


def tiny_wan_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The tiny pipeline's flow-matching schedule (training and sampling)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def latent_bank(vae, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` procedural clips' normalised posterior-mean latents ``[n, C, F', h, w]`` and captions."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents, captions = [], []
    with torch.no_grad():
        for i in range(0, n, 64):
            videos, prompts, _ = random_videos(min(64, n - i), seed=seed * 1_000_003 + i)
            latents.append((vae.encode(to_pixels(videos)).latent_dist.mean - mean) / std)
            captions += prompts
    return torch.cat(latents), captions


def pretrain(pipe: WanPipeline, steps: int, batch_size: int, bank_size: int, seed: int, log_every: int = 100):
    """Pretrain ``pipe.transformer`` with the flow objective on a latent bank (module docstring)."""
    torch.manual_seed(seed)
    bank, captions = latent_bank(pipe.vae, bank_size, seed)
    prompts = sorted(set(captions)) + [""]
    with torch.no_grad():
        table, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    row = {p: i for i, p in enumerate(prompts)}
    caption_rows = torch.tensor([row[c] for c in captions])
    transformer, scheduler, T = pipe.transformer, pipe.scheduler, pipe.scheduler.config.num_train_timesteps
    opt = torch.optim.AdamW(transformer.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        pick = torch.randint(len(bank), (batch_size,), generator=g)
        x0 = bank[pick]
        rows = torch.where(torch.rand(batch_size, generator=g) < 0.1, row[""], caption_rows[pick])
        u = compute_density_for_timestep_sampling("logit_normal", batch_size, 0.0, 1.0, 1.29, generator=g)
        t = scheduler.timesteps[(u * T).long().clamp(0, T - 1)]
        sigma = (t / T).view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        pred = transformer((1 - sigma) * x0 + sigma * noise, t, table[rows]).sample
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            value = loss.item()  # host-ok: offline build script, progress print
            print(f"transformer step {step}: loss {value:.4f} ({time.time() - start:.0f}s)", flush=True)
    transformer.eval().requires_grad_(False)


def build_pipeline(seed: int, steps: int, batch_size: int, bank_size: int) -> WanPipeline:
    """The pretrained tiny ``WanPipeline`` (module docstring)."""
    torch.manual_seed(seed)
    tokenizer = build_umt5_tokenizer(CAPTION_WORDS)
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    text_encoder = tiny_umt5(tokenizer, TEXT_WIDTH).eval().requires_grad_(False)
    vae = latent_statistics(identity_init(tiny_wan_vae()).eval().requires_grad_(False), seed=seed + 5)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=tiny_wan_scheduler(),
        transformer=tiny_wan_transformer(vae.config.z_dim),
    )
    pretrain(pipe, steps, batch_size, bank_size, seed)
    return pipe


def build_preference_set(pipe: WanPipeline, num_pairs: int, seed: int, out: Path, name: str) -> pa.Table:
    """``num_pairs`` pairs of pipeline samples as mp4 files under ``out/<name>/videos`` and the index
    ``out/<name>.parquet`` (paths relative to ``out``), labelled by ``motion_speed`` of the decoded
    files: 1.0 when video 0 is faster, 0.0 when slower, 0.5 on an exact tie."""
    rng = np.random.default_rng(seed)
    prompts = random_prompts(num_pairs, rng)
    seeds = rng.choice(2**31 - 1, size=2 * num_pairs, replace=False).tolist()  # host-ok: numpy, offline build
    clips = sample_videos(pipe, prompts + prompts, seeds, num_frames=NUM_FRAMES, resolution=SIZE)
    videos = out / name / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, clip in enumerate(clips):
        relative = Path(name) / "videos" / f"{i % num_pairs:04d}_{i // num_pairs}.mp4"
        write_video(out / relative, clip)
        paths.append(relative.as_posix())
    decoded = np.stack([to_uint8_frames(read_video(str(out / p), NUM_FRAMES)) for p in paths])
    speed = motion_speed(decoded)
    s0, s1 = speed[:num_pairs], speed[num_pairs:]
    table = pa.table(
        {
            "video_0": pa.array(paths[:num_pairs], pa.string()),
            "video_1": pa.array(paths[num_pairs:], pa.string()),
            "label_0": pa.array(np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5)), pa.float64()),
            "caption": pa.array(prompts, pa.string()),
        }
    )
    pq.write_table(table, out / f"{name}.parquet")
    return table


def to_uint8_frames(clip: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` float in [-1, 1] (``read_video``) to ``[F, H, W, 3]`` uint8."""
    return ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(ASSETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transformer_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--bank_size", type=int, default=2048)
    parser.add_argument("--num_pairs", type=int, default=256)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    start = time.time()
    pipe = build_pipeline(args.seed, args.transformer_steps, args.batch_size, args.bank_size)
    pipe.save_pretrained(out / "tiny-wan", safe_serialization=True)
    table = build_preference_set(pipe, args.num_pairs, args.seed + 1, out, "tiny-wan-prefs")
    labels = table.column("label_0").to_numpy()
    print(
        f"wrote {out / 'tiny-wan'} and {len(labels)} pairs ({(labels == 0.5).sum()} ties) to "
        f"{out / 'tiny-wan-prefs.parquet'} in {time.time() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
