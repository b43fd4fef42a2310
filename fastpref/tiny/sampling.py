"""Sampling a diffusers text-to-image pipeline into uint8 images, one seed per image."""

import inspect

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline


def guidance_kwargs(pipe: DiffusionPipeline, guidance_scale: float, n: int) -> dict:
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
    pipe: DiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 128,
    resolution: int | None = None,
) -> np.ndarray:
    """Generate one image per (prompt, seed): ``[N, H, W, 3]`` uint8.

    Each image's initial noise comes from its own seed, so two pipelines sampled with the
    same ``seeds`` start from identical noise (the paired comparison of the demo). A pipeline
    with a ``DDPMScheduler`` (the tiny SD1.5 / SDXL ones) samples with DDIM from the same
    config; any other scheduler (flow matching's Euler) is kept. ``resolution`` (pixels,
    square) is passed as height and width when given.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    if isinstance(pipe.scheduler, DDPMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
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
    return np.concatenate(out)
