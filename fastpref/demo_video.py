"""The video half of ``fastpref-demo``: ``fastpref-demo --family wan`` or ``python -m fastpref.demo_video``.

Trains LoRA adapters of the bundled tiny Wan pipeline with Diffusion-DPO on its preference set
(of two sampled clips, the one whose shape moves faster wins: ``fastpref.tiny.motion_reward``),
samples the reference and the trained pipeline (``WanPipeline`` + ``load_lora_weights``) from
identical seeds and prompts, prints each one's mean speed and the win-rate of trained over
reference, and writes what a person looks at: ``demo_side_by_side.gif`` and ``.mp4`` (reference |
trained, clip by clip, animated), ``demo_frames.png`` (each pair's frames in two rows) and
``demo_speeds.csv`` (every pair's prompt, seed and two speeds).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_VIDEO_TRAIN_DEFAULTS = {"train_batch_size": 16, "learning_rate": 1e-3, "rank": 8, "report_to": "csv", "beta": 30.0}
"""Trainer settings of the video demo; any trainer flag given to ``fastpref-demo`` overrides them.
β = 30 rather than DPO's default 5000: per element, the flow target ``ε - x0`` of the tiny Wan
model differs between winner and loser far more than an ε target does, and at β 5000 the DPO
sigmoid saturates (loss 3 to 8, every gradient clipped); over 100 steps (128 same-seed pairs,
eval seed 12345) β 5000 gave a 57.0 % win-rate, β 30 69.5 % (README)."""
DEMO_VIDEO_STEPS = 100  # the video demo's default --max_train_steps (fastpref-demo's flag, its own default)
SHOWN = 16  # pairs in the animation and the frame grid


def build_parser():
    """``fastpref-demo``'s flags with the video demo's defaults (``--family wan``, ``--max_train_steps
    DEMO_VIDEO_STEPS``, ``--output_dir fastpref-demo-wan``)."""
    from fastpref.demo import build_parser as demo_parser

    p = demo_parser()
    p.prog = "python -m fastpref.demo_video"
    p.set_defaults(family="wan", max_train_steps=DEMO_VIDEO_STEPS, output_dir="fastpref-demo-wan")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the video demo (``argv``: ``fastpref-demo``'s flags and any trainer flag); returns the
    figures. A ``--family`` whose bundled pipeline is not a video one is refused naming it."""
    import diffusers
    import transformers

    from fastpref.demo import check_demo_args
    from fastpref.training.family import family_class

    args, train_args = build_parser().parse_known_args(argv)
    pipeline_dir = check_demo_args(args, train_args)
    if family_class(pipeline_dir).media != "videos":
        raise ValueError(f"--family: the video demo takes a video family (wan), got {args.family!r}")
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    return run(args, train_args, pipeline_dir)


def _pad(frames: np.ndarray, pixels: int) -> np.ndarray:
    """``[..., H, W, 3]`` with a white border of ``pixels`` on the right and bottom."""
    pad = [(0, 0)] * (frames.ndim - 3) + [(0, pixels), (0, pixels), (0, 0)]
    return np.pad(frames, pad, constant_values=255)


def side_by_side_frames(reference: np.ndarray, trained: np.ndarray, columns: int = 4, scale: int = 3) -> np.ndarray:
    """``[F, H', W', 3]`` uint8 animation frames: a grid of (reference | trained) cells of the
    ``[N, F, H, W, 3]`` clips, frame by frame, upscaled ``scale`` times (nearest)."""
    n = reference.shape[0]
    cells = np.concatenate([_pad(reference, 2), _pad(trained, 2)], axis=3)  # [N, F, H+2, 2(W+2), 3]
    cells = _pad(cells, 4)
    blank = np.full_like(cells[:1], 255)
    cells = np.concatenate([cells, *[blank] * (-n % columns)])
    rows = [np.concatenate(list(cells[i : i + columns]), axis=2) for i in range(0, len(cells), columns)]
    grid = np.concatenate(rows, axis=1)  # [F, rows*h, columns*w, 3]
    return grid.repeat(scale, axis=1).repeat(scale, axis=2)


def frame_grid(reference: np.ndarray, trained: np.ndarray, scale: int = 3) -> Image.Image:
    """A PNG of every frame: per pair two rows (reference above trained), frames left to right."""
    rows = []
    for r, t in zip(reference, trained, strict=True):
        rows.append(np.concatenate(list(_pad(r, 1)), axis=1))
        rows.append(_pad(np.concatenate(list(_pad(t, 1)), axis=1)[None], 3)[0][:, :-3])
    width = max(row.shape[1] for row in rows)
    grid = np.concatenate(
        [np.pad(row, [(0, 0), (0, width - row.shape[1]), (0, 0)], constant_values=255) for row in rows]
    )
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def write_animation(frames: np.ndarray, output_dir: Path, stem: str, fps: int = 4) -> tuple[Path, Path]:
    """``frames`` ``[F, H, W, 3]`` uint8 as ``<stem>.gif`` (looping) and ``<stem>.mp4``."""
    from fastpref.training.video_data import write_video

    gif, mp4 = output_dir / f"{stem}.gif", output_dir / f"{stem}.mp4"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # H.264 needs even sides
    write_video(mp4, even, fps=fps, crf=18)
    return gif, mp4


def run(args, train_args: list[str], pipeline_dir: Path) -> dict:
    """The video demo for the parsed demo flags ``args`` (``fastpref.demo.build_parser``), the
    trainer flags ``train_args`` and the bundled pipeline ``pipeline_dir``; returns the figures."""
    from diffusers import WanPipeline

    from fastpref import train
    from fastpref.demo import win_rate
    from fastpref.demo_curve import load_trained
    from fastpref.pairs.sampling import sample_videos
    from fastpref.tiny.motion import random_prompts
    from fastpref.tiny.motion_reward import motion_speed
    from fastpref.training.config import parse_config

    output_dir = Path(args.output_dir)
    config = parse_config(
        train_args,
        **DEMO_VIDEO_TRAIN_DEFAULTS,
        pretrained_model_name_or_path=str(pipeline_dir),
        output_dir=str(output_dir),
        max_train_steps=args.max_train_steps,
        checkpointing_steps=10**9,
    )
    start = time.time()
    run_ = train.build(config)
    train.train(run_)
    if run_.stopped:
        raise SystemExit(f"fastpref-demo: stopped by a signal during training; {output_dir} holds its checkpoint")
    train_seconds = time.time() - start

    rng = np.random.default_rng(args.eval_seed)
    prompts = random_prompts(args.num_samples, rng)
    seeds = rng.choice(2**31 - 1, size=args.num_samples, replace=False).tolist()  # host-ok: numpy seeds

    def sample(pipe):
        return sample_videos(
            pipe,
            prompts,
            seeds,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            num_frames=run_.config.num_frames,
            resolution=run_.config.resolution,
        )

    reference = sample(WanPipeline.from_pretrained(pipeline_dir))
    trained = sample(load_trained(WanPipeline.from_pretrained(pipeline_dir), output_dir))
    s_ref, s_trained = motion_speed(reference), motion_speed(trained)
    gif, mp4 = write_animation(side_by_side_frames(reference[:SHOWN], trained[:SHOWN]), output_dir, "demo_side_by_side")
    grid = output_dir / "demo_frames.png"
    frame_grid(reference[:SHOWN], trained[:SHOWN]).save(grid)
    with open(output_dir / "demo_speeds.csv", "w") as f:  # every pair's reward, for a second look
        f.write("prompt,seed,speed_reference,speed_trained\n")
        f.writelines(f"{p},{s},{a:.4f},{b:.4f}\n" for p, s, a, b in zip(prompts, seeds, s_ref, s_trained, strict=True))
    figures = {
        "family": args.family,
        "num_samples": args.num_samples,
        "reward_reference": float(s_ref.mean()),
        "reward_trained": float(s_trained.mean()),
        "win_rate": win_rate(s_trained, s_ref),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
    }
    print(
        f"mean speed (pixels per frame): reference {figures['reward_reference']:.3f}, "
        f"trained {figures['reward_trained']:.3f}"
    )
    print(
        f"win-rate of trained over reference: {100 * figures['win_rate']:.1f}% over {args.num_samples} same-seed pairs"
    )
    print(
        f"training {train_seconds:.0f}s, total {figures['total_seconds']:.0f}s; reference | trained: {gif}, {mp4}, "
        f"frames {grid}"
    )
    return figures


if __name__ == "__main__":
    main()
