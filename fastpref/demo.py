"""Demo: align a bundled tiny model with DPO, then compare it with the reference.

    fastpref-demo                    # or: python -m fastpref.demo; the SD1.5 tiny pipeline
    fastpref-demo --family sd3       # any bundled family: sd15, sdxl, sd3, flux
    fastpref-demo --family wan       # text-to-video: fastpref.demo_video

Trains on the family's bundled preference set (the more colourful of two samples wins), samples
the reference and the trained model through the family's diffusers pipeline from identical seeds
and prompts, prints each model's mean reward and the win-rate of trained over reference, and
writes a side-by-side grid and a reward-over-training curve on a held-out set.
"""

import argparse
import time
from pathlib import Path

import diffusers
import numpy as np
import transformers
from diffusers import DiffusionPipeline
from PIL import Image

from fastpref import train
from fastpref.demo_curve import curve_steps, heldout_curve, load_trained, write_curve
from fastpref.tiny.reward import colourfulness
from fastpref.tiny.sampling import sample_images
from fastpref.tiny.shapes import random_prompts
from fastpref.training.bundled import BUNDLED_PIPELINES, bundled_pipeline
from fastpref.training.config import parse_config
from fastpref.training.family import family_class

# trainer settings of the demo; any trainer flag given to fastpref-demo overrides them
DEMO_TRAIN_DEFAULTS = {"train_batch_size": 16, "learning_rate": 5e-3, "rank": 8, "report_to": "csv"}
DEMO_BETA = {"dpo": 200.0}
"""The demo's β for a ``--loss_type`` (its default, DPO) when ``--beta`` is not given: a weaker pull to
the reference than the loss's own default (5000), so that 150 steps make a change the eye sees
(README, "Demo"). Every other loss type keeps its own default β, whose scale differs per loss."""
DEMO_FLAGS_REFUSED = ("--pretrained_model_name_or_path",)  # the demo's --family chooses the pipeline


def win_rate(trained: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of pairs where ``trained`` scores higher, ties counted half."""
    return float(np.mean((trained > reference) + 0.5 * (trained == reference)))


def side_by_side(reference: np.ndarray, trained: np.ndarray, columns: int = 8, scale: int = 3) -> Image.Image:
    """A grid whose cells are (reference | trained) pairs of ``[N, H, W, 3]`` uint8 images."""
    n, h, w, _ = reference.shape
    gap = np.full((h, 2, 3), 255, np.uint8)
    cells = [
        np.concatenate([r, gap, t, np.full((h, 6, 3), 255, np.uint8)], axis=1)
        for r, t in zip(reference, trained, strict=True)
    ]
    blank = np.full_like(cells[0], 255)
    cells += [blank] * (-n % columns)
    rows = [np.concatenate(cells[i : i + columns], axis=1) for i in range(0, len(cells), columns)]
    grid = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows])
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def build_parser() -> argparse.ArgumentParser:
    """The demo's own flags; every other flag goes to the trainer (``fastpref-train --help``)."""
    p = argparse.ArgumentParser(prog="fastpref-demo", description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd15", help=f"bundled tiny pipeline to align: {', '.join(BUNDLED_PIPELINES)}")
    p.add_argument("--output_dir", default="fastpref-demo")
    p.add_argument("--max_train_steps", type=int, default=150)
    p.add_argument("--num_samples", type=int, default=128, help="evaluation prompts (>= 64 for the README figures)")
    p.add_argument("--eval_seed", type=int, default=12345)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--num_inference_steps", type=int, default=20, help="sampler steps of the pipeline")
    p.add_argument("--curve_points", type=int, default=5, help="checkpoints on the held-out reward curve")
    p.add_argument("--curve_samples", type=int, default=32, help="held-out (prompt, seed) pairs of the curve")
    return p


def check_demo_args(args: argparse.Namespace, train_args: list[str]) -> Path:
    """The demo's flags in range (ValueError naming the flag) before any work; returns the
    family's bundled pipeline directory."""
    for name in ("num_samples", "max_train_steps", "num_inference_steps", "curve_points", "curve_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    for flag in DEMO_FLAGS_REFUSED:
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            raise ValueError(f"{flag}: not a demo flag; choose the bundled pipeline with --family")
    return bundled_pipeline(args.family)


def train_config(args: argparse.Namespace, train_args: list[str], pipeline_dir: Path):
    """The trainer's checked ``Config`` of the demo: ``DEMO_TRAIN_DEFAULTS`` and ``DEMO_BETA`` under
    the trainer flags ``train_args``, the family's bundled pipeline, and a checkpoint every
    ``max_train_steps // curve_points`` steps for the held-out curve."""
    config = parse_config(
        train_args,
        **DEMO_TRAIN_DEFAULTS,
        pretrained_model_name_or_path=str(pipeline_dir),
        output_dir=args.output_dir,
        max_train_steps=args.max_train_steps,
        checkpointing_steps=max(1, args.max_train_steps // args.curve_points),
    )
    if config.beta is None and config.loss_type in DEMO_BETA:
        config = config.replace(beta=DEMO_BETA[config.loss_type])
    return config


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the measured figures."""
    args, train_args = build_parser().parse_known_args(argv)
    pipeline_dir = check_demo_args(args, train_args)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if family_class(pipeline_dir).media == "videos":  # the video demo: its own reward and outputs
        from fastpref.demo_video import main as video_demo  # its own defaults (steps, β)

        return video_demo(argv)
    output_dir = Path(args.output_dir)
    config = train_config(args, train_args, pipeline_dir)
    resolution = config.resolution or family_class(pipeline_dir).default_resolution(pipeline_dir)

    start = time.time()
    run = train.build(config)
    train.train(run)
    if run.stopped:
        raise SystemExit(f"fastpref-demo: stopped by a signal during training; {output_dir} holds its checkpoint")
    train_seconds = time.time() - start

    def new_pipeline():
        return DiffusionPipeline.from_pretrained(pipeline_dir)

    def sample(pipe, prompts, seeds):
        return sample_images(
            pipe,
            prompts,
            seeds,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            resolution=resolution,
        )

    rng = np.random.default_rng(args.eval_seed)
    prompts = random_prompts(args.num_samples, rng)
    seeds = rng.choice(2**31 - 1, size=args.num_samples, replace=False).tolist()
    reference = sample(new_pipeline(), prompts, seeds)
    trained = sample(load_trained(new_pipeline(), output_dir), prompts, seeds)

    held_rng = np.random.default_rng([args.eval_seed, 1])  # a set of its own, fixed across checkpoints
    held_prompts = random_prompts(args.curve_samples, held_rng)
    held_seeds = held_rng.choice(2**31 - 1, size=args.curve_samples, replace=False).tolist()
    rows = heldout_curve(
        run,
        new_pipeline,
        lambda pipe: sample(pipe, held_prompts, held_seeds),
        curve_steps(config.max_train_steps, config.checkpointing_steps),
    )
    curve_csv, curve_png = write_curve(rows, output_dir, f"fastpref-demo --family {args.family}")

    r_ref, r_trained = colourfulness(reference), colourfulness(trained)
    figures = {
        "family": args.family,
        "num_samples": args.num_samples,
        "reward_reference": float(r_ref.mean()),
        "reward_trained": float(r_trained.mean()),
        "win_rate": win_rate(r_trained, r_ref),
        "heldout_curve": rows,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
    }
    side_by_side(reference[:32], trained[:32]).save(output_dir / "demo_grid.png")
    gain = figures["reward_trained"] / figures["reward_reference"] - 1
    print(
        f"mean reward (colourfulness): reference {figures['reward_reference']:.4f}, "
        f"trained {figures['reward_trained']:.4f} ({100 * gain:+.0f}%)"
    )
    print(
        f"win-rate of trained over reference: {100 * figures['win_rate']:.1f}% over {args.num_samples} same-seed pairs"
    )
    by_step = ", ".join(f"{r['step']}: {r['reward_mean']:.4f}" for r in rows)
    print(f"held-out reward by step ({args.curve_samples} pairs): {by_step}; {curve_csv}, {curve_png}")
    print(
        f"training {train_seconds:.0f}s, total {figures['total_seconds']:.0f}s; grid (reference | trained): "
        f"{output_dir / 'demo_grid.png'}"
    )
    return figures


def cli() -> None:
    """Console entry point."""
    try:
        main()
    except ValueError as error:
        raise SystemExit(f"fastpref-demo: error: {error}") from error


if __name__ == "__main__":
    cli()
