"""Sampling a diffusers pipeline directory into uint8 images, one seed per image.

``load_pipeline`` reads any pipeline of a family the trainer supports
(``fastpref.training.family``) with ``DiffusionPipeline.from_pretrained``, offline. Each
image's initial noise comes from a CPU generator seeded by its own seed, so a (prompt, seed)
gives the same image whatever the batch, the device or the position in the file (up to the
device's arithmetic), and two pipelines sampled with the same seeds start from identical noise.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

SCHEDULERS = ("auto", "ddim", "pipeline")
"""``--scheduler``: ``pipeline`` samples with the directory's own scheduler; ``ddim`` with DDIM
from its config; ``auto`` with DDIM when the directory's scheduler is the DDPM training
schedule (which needs ~1000 steps to sample), else the directory's own (flow-matching Euler...)."""


def check_pipeline(path: str | Path, resolution: int | None = None, argument: str = "--pretrained_model_name_or_path"):
    """ValueError unless ``path`` is a pipeline directory of a family the trainer supports and
    ``resolution`` (if given) a multiple of its VAE factor; reads configuration files only.
    Returns the family class."""
    from fastpref.training.family import family_class

    if not Path(path).is_dir():
        raise ValueError(f"{argument}: expected a local diffusers pipeline directory, got {str(path)!r}")
    family = family_class(path)
    factor = family.check(Path(path))
    if resolution is not None and resolution % factor:
        raise ValueError(f"--resolution: expected a multiple of the VAE downsampling factor {factor}, got {resolution}")
    if resolution is not None:
        family.check_resolution(Path(path), resolution)
    return family


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **components):
    """The pipeline of directory ``path`` (offline) on ``device``, cast to ``dtype`` when given,
    its progress bar off; ``components`` (name -> module) replace the directory's (the
    trainer's current denoiser and its loaded encoders)."""
    from diffusers import DiffusionPipeline  # here: importing fastpref.pairs stays fast

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype is None else pipe.to(device, dtype)


def quiet_loading() -> None:
    """No weight-loading progress bars or info lines from diffusers and transformers."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def use_scheduler(pipe, scheduler: str = "auto") -> None:
    """Set ``pipe``'s sampling scheduler per ``--scheduler`` (``SCHEDULERS``)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler: expected one of {list(SCHEDULERS)}, got {scheduler!r}")
    if scheduler == "ddim" or (scheduler == "auto" and isinstance(pipe.scheduler, DDPMScheduler)):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def guidance_kwargs(pipe, guidance_scale: float, n: int) -> dict:
    """The call arguments that give ``pipe`` classifier-free guidance of scale ``guidance_scale``
    against the empty prompt, for ``n`` prompts.

    Most pipelines (SD1.5, SDXL, SD3) take ``guidance_scale``. A pipeline whose ``__call__`` has
    ``true_cfg_scale`` (Flux) reads ``guidance_scale`` as the distilled-guidance embedding when its
    denoiser has ``guidance_embeds``, and does classifier-free guidance through ``true_cfg_scale``
    with a negative prompt otherwise.
    """
    if "true_cfg_scale" not in inspect.signature(pipe.__call__).parameters:
        return {"guidance_scale": guidance_scale}
    denoiser = getattr(pipe, "transformer", None)
    if getattr(getattr(denoiser, "config", None), "guidance_embeds", False):
        return {"guidance_scale": guidance_scale}
    return {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * n}


def sample_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 128,
    resolution: int | None = None,
    scheduler: str = "auto",
    progress=None,
) -> np.ndarray:
    """One image per (prompt, seed): ``[N, H, W, 3]`` uint8 (``resolution``: H = W, default the
    pipeline's). ``batch_size`` images per pipeline call; ``progress(n)`` after each call."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    use_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        with torch.no_grad():
            images = pipe(
                prompt=prompts[chunk],
                generator=generators,
                output_type="np",
                num_inference_steps=num_inference_steps,
                **guidance_kwargs(pipe, guidance_scale, len(generators)),
                **size,
            ).images
        out.append(np.round(np.clip(images, 0, 1) * 255).astype(np.uint8))
        if progress is not None:
            progress(len(generators))
    return np.concatenate(out)


def sample_videos(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    num_frames: int,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    resolution: int | None = None,
    batch_size: int = 64,
    progress=None,
) -> np.ndarray:
    """One clip per (prompt, seed) through a text-to-video pipeline (``WanPipeline``): ``[N, F,
    H, W, 3]`` uint8, ``F = num_frames`` (``resolution``: H = W, default the pipeline's). Each
    clip's start noise comes from its own seed's CPU generator (same seeds, same noise); prompts
    are encoded at the length the trainer uses (the tokenizer's ``model_max_length``, capped at
    the pipeline's default 512). ``progress(n)`` after each pipeline call."""
    from fastpref.training.families.wan import PIPELINE_MAX_SEQUENCE_LENGTH

    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    length = min(int(pipe.tokenizer.model_max_length), PIPELINE_MAX_SEQUENCE_LENGTH)
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        with torch.no_grad():
            frames = pipe(
                prompt=prompts[chunk],
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
                max_sequence_length=length,
                **size,
            ).frames
        out.append(np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8))
        if progress is not None:
            progress(len(generators))
    return np.concatenate(out)
