"""The demo's reward-over-training curve: a fixed held-out set of (prompt, seed) pairs sampled
from the reference and from each checkpoint of the run, through the family's diffusers pipeline.

Nothing here runs inside the training step: the trainer writes its usual checkpoints, and the
curve is sampled after training from their ``trainable.safetensors``, converted to the
pipeline's own format by the family's ``save_weights``.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from fastpref.tiny.reward import colourfulness
from fastpref.training.models import load_trainable_state

CURVE_COLUMNS = ("step", "reward_mean", "reward_sem", "win_rate")
"""Columns of ``heldout_curve.csv``: optimizer step (0 = the reference), the held-out set's mean
reward and its standard error, and the win-rate over the reference's samples of the same seeds."""


def load_trained(pipe, weights_dir: Path):
    """``pipe`` with the trained result of ``weights_dir`` (what ``ModelFamily.save_weights``
    wrote): LoRA through ``pipe.load_lora_weights``, else the full denoiser directory (``unet/``,
    ``transformer/``) loaded with the class of the pipeline component of that name."""
    weights_dir = Path(weights_dir)
    if (weights_dir / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(weights_dir)
        return pipe
    for name in pipe.components:
        if (weights_dir / name / "config.json").is_file():
            component = getattr(pipe, name)
            setattr(pipe, name, type(component).from_pretrained(weights_dir / name).to(component.dtype))
            return pipe
    raise ValueError(f"{str(weights_dir)!r} holds neither pytorch_lora_weights.safetensors nor a denoiser directory")


def curve_steps(max_train_steps: int, checkpointing_steps: int) -> list[int]:
    """The steps of the curve: 0 (the reference), every ``checkpointing_steps``-th step, and
    ``max_train_steps`` (the final weights) when it is not a checkpoint step."""
    steps = [0, *range(checkpointing_steps, max_train_steps + 1, checkpointing_steps)]
    return steps if steps[-1] == max_train_steps else [*steps, max_train_steps]


def heldout_curve(
    run,
    new_pipeline: Callable,
    sample: Callable[[object], np.ndarray],
    steps: list[int],
) -> list[dict]:
    """One row per step of ``steps`` (``CURVE_COLUMNS``) from the run's checkpoints.

    ``run``: the finished ``fastpref.training.run.Run`` (its family converts each checkpoint's
    trainable tensors with ``save_weights``); ``new_pipeline()``: a fresh reference pipeline;
    ``sample(pipe)``: the held-out set's ``[N, H, W, 3]`` uint8 images from ``pipe``. Step 0 is
    the reference, the last step the run's final weights in ``output_dir``, the others
    ``checkpoint-<step>``.
    """
    output_dir, reference_mode = Path(run.config.output_dir), run.config.reference
    rewards = {}
    for step in steps:
        pipe = new_pipeline()
        if step == 0:
            rewards[step] = colourfulness(sample(pipe))
            continue
        if step == steps[-1]:
            rewards[step] = colourfulness(sample(load_trained(pipe, output_dir)))
            continue
        tensors = load_file(output_dir / f"checkpoint-{step}" / "trainable.safetensors")
        load_trainable_state(run.family.denoiser, reference_mode, tensors)
        with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
            run.family.save_weights(reference_mode, Path(tmp))
            rewards[step] = colourfulness(sample(load_trained(pipe, Path(tmp))))
    reference = rewards[0]
    return [
        {
            "step": step,
            "reward_mean": float(r.mean()),
            "reward_sem": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else float("nan"),
            "win_rate": float(np.mean((r > reference) + 0.5 * (r == reference))),
        }
        for step, r in rewards.items()
    ]


def write_curve(rows: list[dict], output_dir: Path, title: str) -> tuple[Path, Path]:
    """``heldout_curve.csv`` (``CURVE_COLUMNS``, one row per step) and ``heldout_curve.png``
    (mean reward with its standard error, and the win-rate over the reference, against step)."""
    output_dir = Path(output_dir)
    csv_path, png_path = output_dir / "heldout_curve.csv", output_dir / "heldout_curve.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    mean = np.array([r["reward_mean"] for r in rows])
    sem = np.nan_to_num(np.array([r["reward_sem"] for r in rows]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.plot(steps, mean, marker="o")
    left.fill_between(steps, mean - sem, mean + sem, alpha=0.25)
    left.set(xlabel="step", ylabel="mean reward (colourfulness)", title="held-out reward (± s.e.)")
    right.plot(steps, [100 * r["win_rate"] for r in rows], marker="o", color="C1")
    right.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    right.set(xlabel="step", ylabel="%", title="held-out win-rate over step 0")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return csv_path, png_path
