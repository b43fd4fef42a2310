"""Demo: align the bundled tiny model with DPO, then compare it with the reference.

    fastpref-demo            # or: python -m fastpref.demo

Trains on the bundled preference set (the more colourful of two samples wins), samples the
reference and the trained model from identical seeds and prompts, prints each model's mean
reward and the win-rate of trained over reference, and writes a side-by-side grid.
"""

import argparse
import time
from pathlib import Path

import diffusers
import numpy as np
import transformers
from diffusers import StableDiffusionPipeline
from PIL import Image

from fastpref import train
from fastpref.tiny.reward import colourfulness
from fastpref.tiny.sampling import sample_images
from fastpref.tiny.shapes import random_prompts
from fastpref.training.args import DEFAULT_MODEL
from fastpref.training.config import parse_config

# trainer settings of the demo; any trainer flag given to fastpref-demo overrides them
DEMO_TRAIN_DEFAULTS = {"train_batch_size": 16, "learning_rate": 1e-3, "rank": 8, "report_to": "csv"}


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


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the measured figures."""
    p = argparse.ArgumentParser(prog="fastpref-demo", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="fastpref-demo")
    p.add_argument("--max_train_steps", type=int, default=100)
    p.add_argument("--num_samples", type=int, default=128, help="evaluation prompts (>= 64)")
    p.add_argument("--eval_seed", type=int, default=12345)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    args, train_args = p.parse_known_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if args.num_samples < 1:
        raise ValueError(f"--num_samples: expected >= 1, got {args.num_samples}")
    output_dir = Path(args.output_dir)

    config = parse_config(
        train_args,
        **DEMO_TRAIN_DEFAULTS,
        output_dir=str(output_dir),
        max_train_steps=args.max_train_steps,
        checkpointing_steps=10**9,
    )
    start = time.time()
    train.train(train.build(config))
    train_seconds = time.time() - start

    rng = np.random.default_rng(args.eval_seed)
    prompts = random_prompts(args.num_samples, rng)
    seeds = rng.choice(2**31 - 1, size=args.num_samples, replace=False).tolist()
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    reference = sample_images(pipe, prompts, seeds, guidance_scale=args.guidance_scale)
    if (output_dir / "unet").is_dir():  # --reference copy: a fully fine-tuned UNet
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(output_dir / "unet")
    else:
        pipe.load_lora_weights(output_dir)
    trained = sample_images(pipe, prompts, seeds, guidance_scale=args.guidance_scale)

    r_ref, r_trained = colourfulness(reference), colourfulness(trained)
    figures = {
        "num_samples": args.num_samples,
        "reward_reference": float(r_ref.mean()),
        "reward_trained": float(r_trained.mean()),
        "win_rate": win_rate(r_trained, r_ref),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
    }
    side_by_side(reference[:32], trained[:32]).save(output_dir / "demo_grid.png")
    print(
        f"mean reward (colourfulness): reference {figures['reward_reference']:.4f}, "
        f"trained {figures['reward_trained']:.4f}"
    )
    print(
        f"win-rate of trained over reference: {100 * figures['win_rate']:.1f}% over {args.num_samples} same-seed pairs"
    )
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
