"""``fastpref-pairs``: preference pairs from a pipeline directory, a prompts file and a reward.

    fastpref-pairs --output pairs.parquet      # the bundled tiny pipeline, prompts and reward
    fastpref-pairs --pretrained_model_name_or_path DIR --prompts prompts.txt --num_samples 4 \\
        --reward pickscore --reward_model_path PickScore_v1 --reward_processor_path CLIP-H \\
        --output pairs.parquet
    fastpref-train --pretrained_model_name_or_path DIR --dataset_name pairs.parquet
    fastpref-pairs --pretrained_model_name_or_path fastpref/assets/tiny-wan --output videos.parquet  # video index

Every check (flags, pipeline directory, prompts, reward weights, an existing output or
unfinished run) runs before any model is loaded or any file written. A killed run started again
with the same command continues where it stopped (docs/training.md, "Making preference pairs").
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from fastpref.training.args import ASSETS, DEFAULT_MODEL
from fastpref.training.exits import EXIT_BAD_INPUT

from .rewards import DEFAULT_REWARDS, RewardOptions, check_reward, load_reward
from .sampling import SCHEDULERS, check_pipeline
from .select import PAIRINGS

DEFAULT_PROMPTS = ASSETS / "tiny-prompts.txt"
DEFAULT_VIDEO_PROMPTS = ASSETS / "tiny-wan-prompts.txt"  # captions naming colour, shape and motion
DTYPES = ("no", "fp16", "bf16")
INT_MINIMUM = {
    "num_samples": 2,
    "batch_size": 1,
    "part_size": 1,
    "num_inference_steps": 1,
    "resolution": 1,
    "num_prompts": 1,
    "reward_batch_size": 1,
    "num_frames": 1,
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fastpref-pairs`` (imports nothing heavy)."""
    p = argparse.ArgumentParser(
        prog="fastpref-pairs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Sample K images per prompt from a diffusers pipeline with fixed seeds, score them with a "
        "reward and write the preference pairs as the Pick-a-Pic-layout parquet fastpref-train reads (with each "
        "image's score and seed); a text-to-video pipeline (Wan) gives K clips per prompt and the video index "
        "(video_0, video_1 mp4 paths). Defaults: the bundled tiny pipeline, its prompts and its reward.",
    )
    a = p.add_argument
    a(
        "--pretrained_model_name_or_path",
        default=str(DEFAULT_MODEL),
        help="local diffusers pipeline directory of a family fastpref-train trains",
    )
    a(
        "--lora_weights",
        default=None,
        help="a LoRA directory or file (fastpref-train's output) loaded into the "
        "pipeline: sample the aligned model, for the next round or to measure it",
    )
    a(
        "--prompts",
        default=None,
        help="prompts: a text file (one a line) or a parquet/CSV column (default: the bundled tiny prompts, "
        "tiny-wan-prompts.txt for a video pipeline)",
    )
    a("--prompt_column", default=None, help="column of a parquet/CSV --prompts (default: prompt, caption or text)")
    a("--num_prompts", type=int, default=None, help="use the first this many prompts (default: all)")
    a("--num_samples", type=int, default=4, help="images sampled per prompt (K >= 2)")
    a(
        "--reward",
        default=None,
        help="a registered reward (see docs/training.md) or module:callable "
        "taking (images [N, H, W, 3] uint8, prompts) and returning N scores (video pipelines: clips "
        "[N, F, H, W, 3]); default: colourfulness for images, motion_speed for videos",
    )
    a("--reward_model_path", default=None, help="local model directory of a model-based reward")
    a("--reward_processor_path", default=None, help="its processor directory (default: --reward_model_path)")
    a("--reward_head_path", default=None, help="--reward aesthetic: the predictor's MLP weights file")
    a("--reward_batch_size", type=int, default=32, help="images per forward pass of a model-based reward")
    a(
        "--pairing",
        default="best_worst",
        choices=PAIRINGS,
        help="best_worst: each prompt's best sample against its worst; all: every pair of its samples",
    )
    a(
        "--min_margin",
        type=float,
        default=0.0,
        help="keep a pair only when its reward margin exceeds this (0: drop ties)",
    )
    a("--output", default="fastpref-pairs.parquet", help="the preference parquet to write")
    a("--overwrite", action="store_true", help="replace an existing --output or another run's unfinished parts")
    a("--seed", type=int, default=0, help="run seed: sample k of prompt p uses seed SeedSequence([seed, p, k])")
    a("--batch_size", type=int, default=32, help="images per pipeline call")
    a("--part_size", type=int, default=64, help="prompts per part file (the work a kill can lose)")
    a("--num_inference_steps", type=int, default=20, help="sampling steps")
    a("--guidance_scale", type=float, default=3.0, help="classifier-free guidance scale")
    a("--resolution", type=int, default=None, help="image height and width (default: the pipeline's)")
    a(
        "--num_frames",
        type=int,
        default=None,
        help="video pipelines only: frames per clip (default: 9 for the bundled tiny Wan pipeline, else 81)",
    )
    a("--scheduler", default="auto", choices=SCHEDULERS, help="auto: DDIM for a DDPM-scheduled pipeline, else its own")
    a("--image_format", default="jpeg", choices=("jpeg", "png"), help="how images are stored (jpeg: quality 95)")
    a("--mixed_precision", default="no", choices=DTYPES, help="dtype of the pipeline's weights")
    a("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    a("--no_progress", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    """Every check before any work; returns the prompts. ValueError naming the flag."""
    from .prompts import read_prompts

    for name, minimum in INT_MINIMUM.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name}: expected an integer >= {minimum}, got {value}")
    for name in ("min_margin", "guidance_scale"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name}: expected a finite number >= 0, got {value}")
    family = check_pipeline(args.pretrained_model_name_or_path, args.resolution)
    args.media = family.media
    if family.media == "videos":
        from .video import default_num_frames, default_resolution

        if args.num_frames is None:
            args.num_frames = default_num_frames(args.pretrained_model_name_or_path)
        family.check_num_frames(Path(args.pretrained_model_name_or_path), args.num_frames)
        if args.resolution is None:
            args.resolution = default_resolution(args.pretrained_model_name_or_path)
    elif args.num_frames is not None:
        raise ValueError(
            f"--num_frames: a video flag, and {args.pretrained_model_name_or_path!r} is an image pipeline "
            f"({family.__name__}); got {args.num_frames}"
        )
    if args.reward is None:
        args.reward = DEFAULT_REWARDS[family.media]
    if args.prompts is None:
        args.prompts = str(DEFAULT_VIDEO_PROMPTS if family.media == "videos" else DEFAULT_PROMPTS)
    if args.lora_weights is not None and not Path(args.lora_weights).exists():
        raise ValueError(
            f"--lora_weights: expected a LoRA directory or file, got {args.lora_weights!r}, which does not exist"
        )
    prompts = read_prompts(args.prompts, args.prompt_column)[: args.num_prompts]
    check_reward(args.reward, reward_options(args), family.media)
    return prompts


def reward_options(args: argparse.Namespace) -> RewardOptions:
    return RewardOptions(
        model_path=args.reward_model_path,
        processor_path=args.reward_processor_path,
        head_path=args.reward_head_path,
        device=device_of(args),
        batch_size=args.reward_batch_size,
    )


def device_of(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> dict:
    """Run ``fastpref-pairs`` with ``argv`` (None: ``sys.argv[1:]``); returns the summary
    (``pairs``, ``prompts_now``, ``prompts_before``, ``reward_mean``, ``seconds``, ``output``)."""
    import torch

    from .generate import PairsJob, SamplingSettings, run_job
    from .sampling import load_pipeline, quiet_loading
    from .writer import PartStore

    args = build_parser().parse_args(argv)
    prompts = check_args(args)
    job = PairsJob(
        model=args.pretrained_model_name_or_path,
        lora_weights=args.lora_weights,
        prompts=tuple(prompts),
        num_samples=args.num_samples,
        seed=args.seed,
        reward=args.reward,
        reward_model_path=args.reward_model_path,
        reward_head_path=args.reward_head_path,
        pairing=args.pairing,
        min_margin=args.min_margin,
        image_format=args.image_format,
        sampling=SamplingSettings(args.num_inference_steps, args.guidance_scale, args.resolution, args.scheduler),
        part_size=args.part_size,
        batch_size=args.batch_size,
        media=args.media,
        num_frames=args.num_frames if args.media == "videos" else None,
    )
    PartStore(args.output, job.spec()).check(args.overwrite)  # refuses before the model loads
    quiet_loading()
    start = time.time()
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    pipe = load_pipeline(args.pretrained_model_name_or_path, device_of(args), dtype)
    if args.lora_weights is not None:
        pipe.load_lora_weights(args.lora_weights)
    reward = load_reward(args.reward, reward_options(args), args.media)
    table, summary = run_job(job, pipe, reward, args.output, overwrite=args.overwrite, progress=not args.no_progress)
    summary.update(seconds=time.time() - start, output=str(args.output))
    mean = "" if summary["reward_mean"] is None else f", mean reward of the new samples {summary['reward_mean']:.4f}"
    print(
        f"fastpref-pairs: wrote {summary['pairs']} pairs from {len(prompts)} prompts x {args.num_samples} samples "
        f"to {args.output} ({summary['prompts_before']} prompts were done before){mean} in {summary['seconds']:.1f}s",
        file=sys.stderr,
    )
    if summary["pairs"] == 0:
        print("fastpref-pairs: warning: no pair passed --min_margin; the trainer needs at least one", file=sys.stderr)
    return summary


def cli() -> None:
    """Console entry point: exit status 0 done, 2 bad input (one error line)."""
    try:
        main(None)
    except ValueError as error:
        build_parser().exit(EXIT_BAD_INPUT, f"fastpref-pairs: error: {error}\n")


if __name__ == "__main__":
    cli()
